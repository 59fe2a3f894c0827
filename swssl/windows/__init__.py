"""Cutting images into windows and embedding them: the grid, exact and dense embedding, streaming,
the one embed-and-score loop."""
