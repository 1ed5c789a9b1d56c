"""Engines: turn a live (or stopped) disk into a point-in-time NBD export plus dirty bitmap."""
