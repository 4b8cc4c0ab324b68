"""The engine: the same model as the readable root files, computed faster (engine/fast.py)."""
