"""The commands a learner runs second: train, evaluate, bench, memory, heatmap, pictures.

Each runs from any directory, as `python tools/NAME.py` or `python -m tools.NAME`."""
