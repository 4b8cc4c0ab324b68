"""The fast path: the readable model, computed faster (fast/model.py's FastGPT)."""
