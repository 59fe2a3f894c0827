"""Scoring windows against the memory bank: the bank, the scorers, metrics, evaluation and its reports."""
