"""Data layer: cases, label conventions, sources, preprocessing plans, shards, splits."""
