"""Scoring slides at scale: opening a run, the backends, the runner, its results, heatmaps and gallery."""
