"""The pieces the five deliverables import: argument checks, RoPE, sampling, checkpoints, the
reversal task, and the torch / Hugging Face references the checks compare against."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: checkpoints/, figures/, out/
