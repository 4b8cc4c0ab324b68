"""The pieces the five deliverables import: argument checks, RoPE, sampling, checkpoints and the
reversal task. (The torch / Hugging Face references the checks compare against build on block.py,
so they sit above it, in tools/references.py.)"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: checkpoints/, figures/, out/
