"""The benchmarks, each run as `python bench/<name>.py ...`; records.py holds what they share (imported by name)."""
