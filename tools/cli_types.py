"""What the commands in tools/ share to refuse bad input before any work, as a one-line usage
error (exit 2, no traceback): checkpoint loading by model class, and default outputs, which go
under the repository's out/ (ignored by git), never over a committed file.

The int, float and path types, the flag refusal and the loader behind load_checkpoint are
parts.checks's (cli_int, cli_float, cli_output_file, cli_output_dir, SEED, refuse_unused, cli_load):
generate.py's own command uses them too.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from block import GPT
from fast.model import FastGPT
from generate import path_line
from parts.checks import can_create_in, cli_float, cli_load, one_line, refuse_unused

__all__ = ["OUT_DIR", "REPO", "add_path_flag", "cli_float", "default_output", "load_checkpoint",
           "model_class", "one_line", "path_line", "refuse_unused", "umask", "writable_folder"]

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "out"  # every default output of a command goes under here


def load_checkpoint(ap: argparse.ArgumentParser, path: str | Path, hint: str = "",
                    model_class: type[GPT] = GPT, flag: str = "--checkpoint") -> GPT:
    """model_class.load(path), or a usage error naming the flag and the path
    (parts.checks.cli_load)."""
    return cli_load(ap, path, model_class.load, hint, flag)


def default_output(ap: argparse.ArgumentParser, relative: str) -> Path:
    """OUT_DIR / relative, its folder created now, before any work; a usage error if it cannot
    be written there. Whatever the current directory, the file lands inside the repository."""
    path = OUT_DIR / relative
    writable_folder(ap, path.parent, f"the default output {str(path)!r}", "--out a path")
    return path


def writable_folder(ap: argparse.ArgumentParser, folder: Path, what: str, give: str) -> None:
    """Create folder now, before any work, or a usage error: cannot write `what`; give `give`
    you can write."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # reported just below, with the path
    if not can_create_in(folder):
        ap.error(f"cannot write {what}; give {give} you can write")


def add_path_flag(ap: argparse.ArgumentParser, fast: bool = False) -> None:
    """--fast and --readable: which model a command runs, the readable GPT (block.py,
    attention.py: the code a learner reads) or FastGPT (fast/model.py, proved equal to it).
    `fast` is the default: False for what a learner runs, True for what measures speed."""
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--fast", dest="fast", action="store_true", default=fast,
                       help="run the fast path, fast/model.py" + (" (the default)" if fast else ""))
    group.add_argument("--readable", dest="fast", action="store_false",
                       help="run the readable model, block.py and attention.py"
                            + ("" if fast else " (the default)"))


def model_class(args: argparse.Namespace) -> type[GPT]:
    """The class add_path_flag's flags chose."""
    return FastGPT if args.fast else GPT


def umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
