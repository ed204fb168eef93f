"""Atomic file writes: a temp file beside the target, moved into place only when complete."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `path`; on a clean exit it replaces `path`, on an error it is removed.

    Readers never see half a file, and a crash leaves the old file (if any) as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the mode open() would
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_output(path) as fh:
        fh.write(text)


def unwritable(path: str | Path) -> str | None:
    """Why files cannot be created at `path` (a folder or a file to be), or None; writes nothing.

    Checked before anything slow runs, so a read-only disk, a missing permission or a parent that is a
    file is one line at the start instead of a traceback after the work is done."""
    target = Path(path).absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != target and not existing.is_dir():
        return f"{existing} is a file, so {target} cannot be created under it"
    folder = existing if existing.is_dir() else existing.parent
    # access(2) answers for permissions and for read-only file systems (EROFS) without writing anything,
    # so even a folder's modification time stays as it was.
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write in {folder} (read-only, or no permission)"
    return None
