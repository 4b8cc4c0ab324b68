"""The commands a learner runs second: train, evaluate, bench, memory, heatmap, pictures, the
generate.py command, and each idea's command (flash, window, int8, latent, speculative); beside
them what they share: the flags (cli_types), the measurement (measure), the benchmark's sections
(bench_*) and the torch / Hugging Face references (references).

Each command runs from any directory, as `python tools/NAME.py` or `python -m tools.NAME`."""
