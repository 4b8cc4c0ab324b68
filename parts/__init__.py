"""The pieces the five deliverables import: argument checks, RoPE, sampling, checkpoints, files
written whole or not at all, and the reversal task. (The torch / Hugging Face references the
checks compare against build on block.py, so they sit above it, in tools/references.py.)"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: checkpoints/, figures/, out/
