"""Data side of the SimCLR trainer: sources, two-view loaders and batched augmentations (never imports trainer)."""
