"""Datasets: in-memory tensors (dataset.py), their sources (builtin, files, tensors, safe_archive),
the registry that picks one by name, and the feeds that hand batches to the trainer (feed, streaming)."""
