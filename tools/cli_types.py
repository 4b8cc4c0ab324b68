"""What the commands share to refuse bad input before any work, as a one-line usage error (exit 2,
no traceback): a checked float type, checkpoint loading, flags a mode does not use, and default
outputs, which go under the repository's out/ (ignored by git), never over a committed file.

The int and path types are parts.checks's (cli_int, cli_output_file, cli_output_dir, SEED).
"""

from __future__ import annotations

import argparse
import math
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from block import GPT
from parts.checks import can_create_in

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "out"  # every default output of a command goes under here


def cli_float(low: float | None = None, high: float | None = None, *, low_open: bool = False,
              high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in [low, high] ("(" or ")" where open; None = unbounded).
    nan, inf, -inf and 1e400 (which Python reads as inf) are refused by name."""
    interval = (f"{'(-inf' if low is None else ('(' if low_open else '[') + str(low)}, "
                f"{'inf)' if high is None else str(high) + (')' if high_open else ']')}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value
    return parse


def one_line(err: BaseException) -> str:
    """An exception's message on one line (a library's message may span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def load_checkpoint(ap: argparse.ArgumentParser, path: str | Path, hint: str = "") -> GPT:
    """GPT.load(path), or a usage error naming the path: every refusal GPT.load raises (a missing
    file, a directory, garbage, a .npy renamed .npz, a bad config or weights) becomes one line."""
    try:
        # np.load reads a non-zip file as .npy or pickle: a renamed .npy would load as one array
        # and garbage would be called "pickled data". A .npz is a zip archive; say so plainly.
        if Path(path).is_file() and not zipfile.is_zipfile(path):
            raise ValueError(f"{str(path)!r} is not a .npz checkpoint (not a zip archive of "
                             "arrays: garbage, or another format such as a renamed .npy)")
        return GPT.load(path)
    except (ValueError, TypeError, OSError) as err:
        message = one_line(err)
        where = "" if str(path) in message else f" ({str(path)!r})"
        ap.error(f"argument --checkpoint: {message}{where}{hint}")


def default_output(ap: argparse.ArgumentParser, relative: str) -> Path:
    """OUT_DIR / relative, its folder created now, before any work; a usage error if it cannot
    be written there. Whatever the current directory, the file lands inside the repository."""
    path = OUT_DIR / relative
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # reported just below, with the path
    if not can_create_in(path.parent):
        ap.error(f"cannot write the default output {str(path)!r}; give --out a path you can "
                 "write")
    return path


def refuse_unused(ap: argparse.ArgumentParser, args: argparse.Namespace,
                  flags: Iterable[str], why: str) -> None:
    """A usage error if any of `flags` (e.g. "--top-k") was given, i.e. is not None/False: a flag
    the run would ignore is refused, never silently dropped."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value is not False:
            ap.error(f"{flag} {why}")
