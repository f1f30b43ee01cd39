"""birdrounds: teacher -> pseudo-label -> student rounds for bioacoustic classification."""

__version__ = "0.1.0"
