"""Data: the embedded synthetic dataset, image loading/preprocessing, and code shards."""
