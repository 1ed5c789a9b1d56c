"""Reading a point-in-time NBD export: which segments (extents.py, pure) and their bytes (reader.py)."""
