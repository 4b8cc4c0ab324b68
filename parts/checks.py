"""Argument checks shared by every module.

Each check raises a ValueError or TypeError that names the argument, says what it got and what it
expected, and is called before any work is done, so a refused call changes nothing.

A public function checks its door once. `@door` runs a function's checks (`check_<its name>`, in
its own module) when it is called directly, and skips them inside `checked_call()`: the model's
call and the generate functions check the whole call at their own door, so the building blocks
they run (split_heads, softmax, ...) do not check the same arrays again on the way down.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import inspect
import math
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np

F = TypeVar("F", bound=Callable)
_INSIDE_CHECKED_CALL = contextvars.ContextVar("inside_checked_call", default=False)


def door(fn: F) -> F:
    """Give fn its door: `check_<fn's name>` from fn's module runs first, with fn's arguments
    (all of them, defaults filled in, by position), unless fn is called inside checked_call().
    The check raises on bad input, and may return the leading arguments converted (a list as an
    array); None keeps them as they were."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def entry(*args, **kwargs):  # noqa: ANN202 (fn's own signature, through functools.wraps)
        if _INSIDE_CHECKED_CALL.get():
            return fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        args = bound.args
        converted = fn.__globals__[f"check_{fn.__name__}"](*args)
        if converted is not None:
            args = (*converted, *args[len(converted):])
        return fn(*args)

    return entry  # type: ignore[return-value]


@contextmanager
def checked_call() -> Iterator[None]:
    """Everything run inside was checked at the entry that opened it: @door checks are skipped."""
    token = _INSIDE_CHECKED_CALL.set(True)
    try:
        yield
    finally:
        _INSIDE_CHECKED_CALL.reset(token)


def is_int(value: object) -> bool:
    """A Python or NumPy integer, but not a bool (True is an int in Python, never a size here)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    """A Python or NumPy int or float, but not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def positive_int(name: str, value: object) -> int:
    """value as an int if it is an integer >= 1, else ValueError naming `name`."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def optional_positive_int(name: str, value: object) -> int | None:
    return None if value is None else positive_int(name, value)


def finite_number(name: str, value: object, *, above: float | None = None,
                  at_least: float | None = None) -> float:
    """value as a float if it is a finite real number (> above, >= at_least when given)."""
    try:
        finite = is_real(value) and math.isfinite(value)
    except OverflowError:  # an int too large for a float, e.g. 10**400
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {value!r:.40}")
    if above is not None and not value > above:
        raise ValueError(f"{name} must be > {above}, got {value!r}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{name} must be >= {at_least}, got {value!r}")
    return float(value)


def float_dtype(name: str, dtype: object, allowed: tuple[str, ...]) -> np.dtype:
    """np.dtype(dtype) if it is one of `allowed` (e.g. ("float32", "float64")).

    None is refused by name: np.dtype(None) is float64, a silent default nobody asked for."""
    if dtype is None:
        raise TypeError(f"{name} must be one of {', '.join(allowed)}, got None")
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be one of {', '.join(allowed)}, got {dtype!r}") from None
    if resolved.name not in allowed:
        raise TypeError(f"{name} must be one of {', '.join(allowed)}, got {resolved.name}")
    return resolved


def int_array(name: str, value: object, ndim: int) -> np.ndarray:
    """value as an integer ndarray of `ndim` dimensions (a list is accepted and converted)."""
    if isinstance(value, np.ndarray) and type(value) is not np.ndarray:
        raise TypeError(f"{name} must be a plain numpy array, got {type(value).__name__} (a "
                        "masked array's mask would be dropped)")
    array = np.asarray(value) if isinstance(value, (np.ndarray, list, tuple)) else None
    if array is None:
        raise TypeError(f"{name} must be an integer array, got {type(value).__name__}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {array.dtype}")
    return array


def float_array(name: str, value: object, *, ndim: int | None = None, min_ndim: int = 0,
                allow_int: bool = False) -> np.ndarray:
    """value as a plain ndarray of real floats (ints too if allow_int; a list or tuple is
    converted), with exactly `ndim` or at least `min_ndim` dimensions.

    NumPy subclasses are refused: np.matrix changes what @ and * mean, and a masked array's mask
    would be silently dropped by the arithmetic below it."""
    if isinstance(value, (list, tuple, np.generic)):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray) or type(value) is not np.ndarray:
        raise TypeError(f"{name} must be a plain numpy array, got {type(value).__name__}")
    kinds = "fiu" if allow_int else "f"
    if value.dtype.kind not in kinds:
        raise TypeError(f"{name} must hold real {'numbers' if allow_int else 'floats'}, got dtype "
                        f"{value.dtype}")
    if (ndim is not None and value.ndim != ndim) or value.ndim < min_ndim:
        wanted = f"{ndim}" if ndim is not None else f"at least {min_ndim}"
        raise ValueError(f"{name} must have {wanted} dimension(s), got shape {value.shape}")
    return value


def token_ids(name: str, value: object, ndim: int, vocab_size: int) -> np.ndarray:
    """An integer array of `ndim` dimensions, no axis empty, every id in [0, vocab_size)."""
    ids = int_array(name, value, ndim)
    if 0 in ids.shape:
        raise ValueError(f"{name} must not be empty, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"{name} must be in [0, {vocab_size}), got min {ids.min()} "
                         f"max {ids.max()}")
    return ids


def zero_one_mask(name: str, value: object, shape: tuple[int, ...]) -> np.ndarray:
    """A 1 = real token / 0 = padding mask of exactly `shape`, as bool.

    Only 0/1 (or bool) is accepted: 0.5, 2, -1 or NaN have no meaning here, and reading them as
    "anything non-zero is real" would silently treat a typo as a token."""
    if type(value) is not np.ndarray:
        raise TypeError(f"{name} must be a numpy array of 0/1 (not a subclass), got "
                        f"{type(value).__name__}")
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {value.shape}")
    if value.dtype != np.bool_:
        if not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
            raise TypeError(f"{name} must hold 0/1 (or bool), got dtype {value.dtype}")
        if not np.isin(value, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0 (padding) and 1 (real token)")
    return value.astype(bool)


# --- command lines: a one-line usage error before any work, never a traceback --------------------

def cli_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [low, high] (no upper bound if high is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    return parse


def cli_output_file(*suffixes: str) -> Callable[[str], Path]:
    """An argparse type: a file path to write, checked before any work is done. It must end in
    one of `suffixes` (nothing is appended to it), must not be a directory, and its directory
    must exist and be writable: so the file written is exactly the one named."""
    def parse(text: str) -> Path:
        path = Path(text)
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(
                f"{text!r} must end in {' or '.join(suffixes)}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
        if not can_create_in(path.parent):
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory "
                                             f"{str(path.parent)!r} does not exist or is not "
                                             "writable")
        return path
    return parse


def can_create_in(directory: Path) -> bool:
    """Whether a file can be created in `directory`, found by creating (and removing) one: a
    permission bit alone says yes to root in /proc, where nothing can be created."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def cli_output_dir(text: str) -> Path:
    """An argparse type: a directory to write into; created if missing, if its parent exists."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    base = path if path.exists() else path.parent
    if not can_create_in(base):
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: {str(base)!r} does not "
                                         "exist or is not writable")
    return path


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


def refuse_unused(ap: argparse.ArgumentParser, args: argparse.Namespace,
                  flags: Iterable[str], why: str) -> None:
    """A usage error if any of `flags` (e.g. "--top-k") was given, i.e. is not None/False: a flag
    the run would ignore is refused, never silently dropped."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value is not False:
            ap.error(f"{flag} {why}")


def cli_load(ap: argparse.ArgumentParser, path: str | Path, load: Callable[[Path], object],
             hint: str = "", flag: str = "--checkpoint") -> object:
    """load(path) (a model class's .load), or a usage error naming the flag and the path: every
    refusal the loader raises (a missing file, a directory, garbage, a .npy renamed .npz, a bad
    config or weights) becomes one line."""
    try:
        # np.load reads a non-zip file as .npy or pickle: a renamed .npy would load as one array
        # and garbage would be called "pickled data". A .npz is a zip archive; say so plainly.
        if Path(path).is_file() and not zipfile.is_zipfile(path):
            raise ValueError(f"{str(path)!r} is not a .npz checkpoint (not a zip archive of "
                             "arrays: garbage, or another format such as a renamed .npy)")
        return load(path)
    except (ValueError, TypeError, OSError) as err:
        message = one_line(err)
        where = "" if str(path) in message else f" ({str(path)!r})"
        ap.error(f"argument {flag}: {message}{where}{hint}")


SEED = cli_int(0, 2**32 - 1)  # what np.random.default_rng and torch.manual_seed both take


def available_memory() -> int | None:
    """Bytes of memory this machine can still hand out (Linux MemAvailable), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file says kB
    except (OSError, ValueError, IndexError):
        pass
    return None


SMALL_ALLOCATION = 1 << 26  # 64 MiB: any machine that runs this has it; no need to ask


def fits_in_memory(what: str, n_bytes: int) -> None:
    """Refuse, before allocating, a request that needs more memory than the machine has free.
    Below SMALL_ALLOCATION nothing is read: a decode step never pays for asking."""
    if n_bytes < SMALL_ALLOCATION:
        return
    free = available_memory()
    if free is not None and n_bytes > free:
        raise ValueError(f"{what} needs {n_bytes / 2**30:.1f} GiB, more than the "
                         f"{free / 2**30:.1f} GiB of memory available")
