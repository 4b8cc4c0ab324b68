"""Files written whole or not at all: every file this repository writes goes through here.

A write that is cut short (Ctrl-C, a full disk, a serialiser that raises half-way) must not leave
a truncated file where a good one was. Opening the destination for writing empties it at once,
so the old checkpoint, log or figure would be gone before the first new byte arrived. Instead:

    1. the new content goes to a temporary file in the destination's own directory,
    2. only once it is complete (and flushed to disk) does os.replace put it in place.

os.replace within one directory is a rename, which POSIX and Windows do in one step: a reader
sees the old file or the new one, never half of either. On any failure the temporary file is
removed and the error goes on; the destination is untouched. (A process killed outright, e.g.
SIGKILL, cannot clean up: it leaves a hidden `.NAME.*.tmp*` beside the destination, still never a
broken destination.)

    with replacing(path) as tmp:        the general form: write the file `tmp` any way you like
        fig.savefig(tmp)
    write_text(path, text), write_json(path, obj), save_figure(fig, path): the usual three.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["replacing", "save_figure", "write_json", "write_text"]


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, empty temporary file beside `path` (same directory, same suffix, so a writer
    that reads the format from the name sees the right one); when the block ends without an
    error, that file replaces `path` in one step. On any error, including KeyboardInterrupt, the
    temporary file is removed and `path` is left as it was. A symlink is written through, as
    open() would: its target is replaced, the link stays."""
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                suffix=f".tmp{target.suffix}")
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        _flush_to_disk(temporary)
        os.chmod(temporary, _mode_for(target))
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to exactly `path`, whole or not at all; return the path."""
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: object, **dumps: object) -> Path:
    """json.dump(obj) into exactly `path` (one newline at the end), whole or not at all: a value
    the encoder refuses half-way leaves the old file as it was. `dumps` go to json.dump (indent,
    default, ...). Returns the path."""
    with replacing(path) as temporary, open(temporary, "w", encoding="utf-8") as f:
        json.dump(obj, f, **dumps)
        f.write("\n")
    return Path(path)


def save_figure(fig: object, path: str | os.PathLike, **savefig: object) -> Path:
    """fig.savefig to exactly `path`, whole or not at all (a matplotlib Figure, from pyplot or
    not; the format comes from path's suffix unless `format` is given). Returns the path."""
    with replacing(path) as temporary:
        fig.savefig(temporary, **savefig)
    return Path(path)


def _flush_to_disk(path: Path) -> None:
    """fsync the file's data, so the rename never publishes a file whose blocks are not yet on
    disk (after a power cut, a renamed but unwritten file would be empty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mode_for(target: Path) -> int:
    """The permissions the file would have had if written in place: an existing file keeps its
    own; a new one gets 0o666 less the umask, as open() gives it (mkstemp makes 0o600)."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
        os.umask(umask)
        return 0o666 & ~umask
