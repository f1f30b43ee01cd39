"""Data layer: BirdCLEF layout, audio decoding and cache, datasets, splits, synthetic data."""
