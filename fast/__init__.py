"""The fast path: the readable model of block.py and attention.py, computed faster (fast/model.py)."""
