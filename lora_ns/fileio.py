"""Atomic file writes: a temp file beside the target, moved into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from lora_ns.errors import fail


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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the mode open() would
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; on a clean exit it takes `path`'s place, so `path` is whole
    or as it was. `replace=False` builds once: where another process (e.g. a DDP rank) got there first,
    its folder stays."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # not mkdtemp: that one is private (0700), and the rename would keep it so
    try:
        yield tmp
        if replace:
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # the target exists again: only a build-once loser may leave it be
            if replace or not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def guard_output_file(path: str | Path, overwrite: bool, flag: str = "--output-file") -> None:
    """Refuse to replace an existing file unless asked (checked before any model is loaded)."""
    if Path(path).is_dir():  # first: --overwrite would not help
        raise fail(str(path), flag, "is a folder", "give a file path")
    if Path(path).exists() and not overwrite:
        raise fail(str(path), flag, "already exists", "choose another path or pass --overwrite")
    if why := unwritable(path):
        raise fail(str(path), flag, why, "choose a path you can write to")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")
