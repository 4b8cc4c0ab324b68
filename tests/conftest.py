"""Shared test setup: import the flat top-level modules from the repository root.

The modules (attention.py, cache.py, block.py, generate.py, rope.py) are not a package, so the
repository root goes on sys.path once here instead of in every test file.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Hugging Face models in the tests are built from local configs with random weights; make sure
# nothing is ever fetched and no chatter reaches the test output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
