"""sf2dist: identity-sharded SphereFace2 training for million-identity face recognition."""

__version__ = "0.1.0"
