"""Turn a folder of raw documents into one clean text file for continued pretraining.

    python -m lora_ns.preprocess --raw-dir data/raw --out-file data/processed/all_text.txt --num-workers 16

Reads ``.txt``, ``.csv`` (one text column), ``.docx`` and ``.zip`` archives of those (read in memory,
never extracted) found recursively under ``--raw-dir``; hidden files and other extensions are ignored
and counted. Each sample is one paragraph by default (``--unit file|paragraph|line``), whitespace
normalized, written one per line (``--format txt``) or as ``{"text": ...}`` JSON lines.

Design notes:

* Streaming with bounded memory. Large ``.txt`` files are cut into ~4 MiB byte ranges that end on a
  blank line, so one worker never holds more than one range, and a 1 GB file is spread over the pool.
  A task whose output grows past a limit (a huge CSV or archive member) spills it to a temp file.
  The parent keeps a small window of tasks in flight and writes results in submission order, so the
  output is byte-identical for any ``--num-workers`` and memory stays flat as the corpus grows.
* A file that cannot be read is skipped with a reason in the report; the run never dies on one file.
* Decoding: UTF-8 (a BOM is tolerated), falling back to GB18030 and then Latin-1 per unit of work (a
  whole file, one range of a large ``.txt``, one archive member); fallbacks are listed in the report.
* With ``--unit file`` a .txt larger than one range yields one sample per range (~4 MiB each).
* CJK-safe: joining the lines of a hard-wrapped paragraph adds no space between two CJK characters.
* The output is written to a temp file in the same folder and moved into place with ``os.replace``.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from json.encoder import encode_basestring
from pathlib import Path
from typing import IO

from lora_ns.errors import OneLineParser, fail, run_cli
from lora_ns.fileio import unwritable

PROG = "lora_ns.preprocess"
KINDS = {".txt": "txt", ".csv": "csv", ".docx": "docx", ".zip": "zip"}
FORMATS = ("txt", "jsonl")
UNITS = ("paragraph", "file", "line")
DEFAULT_ENCODINGS = ("utf-8", "gb18030", "latin-1")
CHUNK_BYTES = 4 << 20  # nominal size of one range of a large .txt file
CUT_SLACK = 1 << 20  # how far past the nominal end we look for a blank line to cut at
SPILL_BYTES = 8 << 20  # a task's output beyond this goes to a temp file instead of RAM
CSV_FIELD_LIMIT = 16 << 20  # one CSV cell; an unclosed quote then fails fast instead of eating RAM
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# Scripts written without spaces between words: Han, kana, bopomofo, CJK punctuation and
# fullwidth forms. Hangul is left out on purpose (Korean separates words with spaces).
_CJK = ("[\u2e80-\u2fdf\u3001-\u303f\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3200-\u4dbf"
        "\u4e00-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uff9f\uffe0-\uffe6\U00020000-\U0003ffff]")
# A line break with a CJK character on both sides. It starts with a literal "\n" so the regex
# engine can skip ahead quickly instead of testing the look-behind at every position.
_CJK_BREAK = re.compile(f"\n(?<={_CJK}\n)(?={_CJK})")
_SINGLE_BREAK = re.compile(r"\n(?<!\n\n)(?!\n)")  # a line break that is not part of a blank line
_BLANK_RUN = re.compile(r"\n\n+")
_BINARY = "binary data (NUL bytes; UTF-16 without a BOM?) — not a text file"


class SkipFile(Exception):
    """A source cannot be read; the message is the reason shown in the report."""


@dataclass
class PreprocessReport:
    """What a run did. Paths are relative to the raw dir; ``a.zip::b.txt`` names an archive member."""

    out_file: str = ""
    files_read: int = 0
    files_skipped: list[tuple[str, str]] = field(default_factory=list)
    files_ignored: int = 0
    ignored_by_ext: dict[str, int] = field(default_factory=dict)
    fallback_encodings: list[tuple[str, str]] = field(default_factory=list)
    samples_written: int = 0
    duplicates_dropped: int = 0
    short_dropped: int = 0
    bytes_in: int = 0
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["files_skipped"] = [{"path": p, "reason": r} for p, r in self.files_skipped]
        data["fallback_encodings"] = [{"path": p, "encoding": e} for p, e in self.fallback_encodings]
        data["mb_per_s"] = round(self.mb_per_s, 2)
        return data

    def summary(self, max_listed: int = 20) -> str:
        ignored = ", ".join(f"{ext} x{n}" for ext, n in sorted(self.ignored_by_ext.items()))
        lines = [
            f"{PROG}: {self.files_read} files read, {len(self.files_skipped)} skipped, "
            f"{self.files_ignored} ignored{f' ({ignored})' if ignored else ''} -> {self.out_file}",
            f"  samples written: {self.samples_written:,} (duplicates dropped: {self.duplicates_dropped:,}, "
            f"too short: {self.short_dropped:,})",
            f"  read {self.bytes_in / 1e6:,.1f} MB in {self.seconds:.1f} s ({self.mb_per_s:,.1f} MB/s)",
        ]
        for title, rows in (("decoded with a fallback encoding", self.fallback_encodings),
                            ("skipped", self.files_skipped)):
            if rows:
                lines.append(f"  {title}:")
                lines += [f"    {path}: {what}" for path, what in rows[:max_listed]]
                if len(rows) > max_listed:
                    lines.append(f"    ... and {len(rows) - max_listed} more (see --report-file)")
        return "\n".join(lines)


@dataclass(frozen=True)
class Options:
    """Per-run settings shipped to every worker."""

    fmt: str = "txt"
    unit: str = "paragraph"
    min_chars: int = 0
    csv_column: str = "text"
    encodings: tuple[str, ...] = DEFAULT_ENCODINGS
    spill_dir: str | None = None
    spill_bytes: int = SPILL_BYTES
    block_chars: int = CHUNK_BYTES  # streamed sources (archive members, UTF-16) are cut into blocks this big


@dataclass(frozen=True)
class Task:
    """One unit of work: a whole file, or the byte range [start, end) of a large .txt file."""

    path: str
    rel: str
    kind: str
    start: int = 0
    end: int = 0
    part: int = 0
    last: bool = True
    error: str = ""  # set when planning already failed (the file vanished or cannot be read)


@dataclass
class TaskResult:
    """A task's encoded output (blobs in memory and/or a spill file) plus what went wrong."""

    task: Task
    blobs: list[bytes] = field(default_factory=list)
    spill: str | None = None
    samples: int = 0
    short: int = 0
    error: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    encodings: list[tuple[str, str]] = field(default_factory=list)


# --- text normalization -------------------------------------------------------------------------

def _clean(text: str) -> str:
    """Unify line endings (CRLF and CR become LF); drop NULs and stray BOMs (concatenated files)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text or "\ufeff" in text:
        text = text.replace("\x00", "").replace("\ufeff", "")
    return text


def samples_from_text(text: str, unit: str, keep_newlines: bool) -> list[str]:
    """Split text into normalized samples: one per line, per blank-line-separated paragraph, or one
    for the whole text. Inside a line every run of whitespace becomes one space and lines are
    stripped. With `keep_newlines` (jsonl) a sample keeps its line breaks (paragraphs separated by
    one blank line); otherwise it is flattened to one line, where a break between two CJK
    characters is dropped (a hard-wrapped Chinese sentence must not gain spaces) and any other
    break becomes a space.

    Only the per-line normalization is a Python-level loop; the rest are whole-block string and
    regex operations, since this is the hot path of the module.
    """
    text = "\n".join([" ".join(line.split()) for line in _clean(text).split("\n")])
    if unit == "line":
        return [line for line in text.split("\n") if line]
    if unit == "file":
        text = _BLANK_RUN.sub("\n\n" if keep_newlines else "\n", text).strip("\n")
        if not keep_newlines:
            text = _CJK_BREAK.sub("", text).replace("\n", " ")
        return [text] if text else []
    if not keep_newlines:
        text = _SINGLE_BREAK.sub(" ", _CJK_BREAK.sub("", text.strip("\n")))
    return [p for p in (piece.strip("\n") for piece in text.split("\n\n")) if p]


def _last_break(text: str, unit: str, look_back: int = CUT_SLACK) -> int:
    """Where to cut a streamed text block: just after its last blank line (so no paragraph is split),
    else after its last newline; 0 when there is no newline at all."""
    last = i = text.rfind("\n")
    if unit != "line":
        while i > 0 and last - i < look_back:
            j = text.rfind("\n", 0, i)
            if text[j + 1:i].isspace() or j + 1 == i:
                return i + 1
            i = j
    return last + 1


# --- per-task output ----------------------------------------------------------------------------

class Sink:
    """Encoded output of one task as blobs of complete newline-terminated records, kept in memory up
    to a limit and then spilled to a temp file (a huge CSV or archive member never sits in RAM).

    `mark`/`rollback` drop what a failed attempt produced (a decode retry, a bad archive member).
    """

    def __init__(self, opts: Options):
        self.opts = opts
        self.blobs: list[bytes] = []
        self.nbytes = 0
        self.samples = 0
        self.short = 0
        self.spill_path: str | None = None
        self._fh: IO[bytes] | None = None

    def add_all(self, samples: list[str]) -> None:
        if self.opts.min_chars:
            kept = [s for s in samples if len(s) >= self.opts.min_chars]
            self.short += len(samples) - len(kept)
            samples = kept
        if not samples:
            return
        if self.opts.fmt == "jsonl":  # same bytes as json.dumps({"text": s}, ensure_ascii=False), faster
            blob = ('{"text": ' + '}\n{"text": '.join(map(encode_basestring, samples)) + "}\n").encode("utf-8")
        else:
            blob = ("\n".join(samples) + "\n").encode("utf-8")
        self.samples += len(samples)
        self.nbytes += len(blob)
        if self._fh is not None:
            self._fh.write(blob)
            return
        self.blobs.append(blob)
        if self.nbytes > self.opts.spill_bytes and self.opts.spill_dir:
            self._spill()

    def _spill(self) -> None:
        fd, self.spill_path = tempfile.mkstemp(suffix=".part", dir=self.opts.spill_dir)
        self._fh = os.fdopen(fd, "wb")
        self._fh.writelines(self.blobs)
        self.blobs = []

    def mark(self) -> tuple[int, int, int, int]:
        return self.samples, self.short, self.nbytes, len(self.blobs)

    def rollback(self, mark: tuple[int, int, int, int]) -> None:
        self.samples, self.short, self.nbytes, kept = mark
        if self._fh is not None:  # everything so far is in the file, so its size is nbytes
            self._fh.seek(self.nbytes)
            self._fh.truncate()
        else:
            del self.blobs[kept:]

    def close(self, discard: bool = False) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if discard:
            self.blobs = []
            if self.spill_path:
                os.unlink(self.spill_path)
                self.spill_path = None


# --- readers ------------------------------------------------------------------------------------

def _codec(name: str) -> str:
    """The codec used for `name`: UTF-8 goes through utf-8-sig so a leading BOM is dropped."""
    return "utf-8-sig" if codecs.lookup(name).name == "utf-8" else name


def decode_bytes(data: bytes, encodings: Sequence[str]) -> tuple[str, str]:
    """Decode with the first encoding that works; return (text, encoding name)."""
    for name in encodings:
        try:
            return data.decode(_codec(name)), name
        except UnicodeDecodeError:
            continue
    raise SkipFile(f"not valid text in {', '.join(encodings)} — re-save it as UTF-8")


def read_text_stream(open_raw: Callable[[], IO[bytes]], encodings: Sequence[str],
                     opts: Options, sink: Sink) -> str:
    """Stream text in blocks cut at paragraph breaks; on a decode error throw the attempt away and
    try the next encoding. With ``--unit file`` each block is one sample, as for large .txt files."""
    for name in encodings:
        mark = sink.mark()
        try:
            with open_raw() as raw, io.TextIOWrapper(raw, encoding=_codec(name)) as stream:
                for block in _text_blocks(stream, opts.block_chars, opts.unit):
                    sink.add_all(samples_from_text(block, opts.unit, opts.fmt == "jsonl"))
            return name
        except UnicodeDecodeError:
            sink.rollback(mark)
    raise SkipFile(f"not valid text in {', '.join(encodings)} — re-save it as UTF-8")


def _text_blocks(stream: IO[str], size: int, unit: str) -> Iterator[str]:
    """Blocks of about `size` characters, each ending at a paragraph break (see `_last_break`)."""
    carry = ""
    while True:
        chunk = stream.read(size)
        if not chunk:
            break
        block = carry + chunk
        cut = _last_break(block, unit) or len(block)
        carry = block[cut:]
        yield block[:cut]
    if carry:
        yield carry


def read_txt_task(task: Task, opts: Options, sink: Sink) -> str:
    """Read one byte range of a .txt file (a small file is one range); return the encoding used."""
    with open(task.path, "rb") as fh:
        if task.start == 0 and fh.read(2) in _UTF16_BOMS:
            return read_text_stream(partial(open, task.path, "rb"), ("utf-16",), opts, sink)
        fh.seek(task.start)
        data = fh.read(task.end - task.start)
    if task.start == 0 and b"\x00" in data[:8192]:
        raise SkipFile(_BINARY)
    text, name = decode_bytes(data, opts.encodings)
    del data
    sink.add_all(samples_from_text(text, opts.unit, opts.fmt == "jsonl"))
    return name


def _csv_column(header: list[str], wanted: str) -> int:
    names = [h.strip() for h in header]
    if wanted in names:
        return names.index(wanted)
    shown = ", ".join(repr(n) for n in names[:10]) + (", ..." if len(names) > 10 else "")
    raise SkipFile(f"no column {wanted!r} (columns: {shown}) — pass --csv-column NAME")


def read_csv_stream(open_raw: Callable[[], IO[bytes]], opts: Options, sink: Sink) -> str:
    """One document per row of the chosen column; decode fallback restarts the whole file."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    for name in opts.encodings:
        mark = sink.mark()
        try:
            with open_raw() as raw, io.TextIOWrapper(raw, encoding=_codec(name), newline="") as text:
                reader = csv.reader(text)
                try:
                    col = _csv_column(next(reader), opts.csv_column)
                    _add_cells((row[col] for row in reader if col < len(row) and row[col]), opts, sink)
                except StopIteration:
                    raise SkipFile("empty CSV (no header row)") from None
                except csv.Error as err:
                    raise SkipFile(f"malformed CSV near line {reader.line_num}: {err}") from None
            return name
        except UnicodeDecodeError:
            sink.rollback(mark)
    raise SkipFile(f"not valid text in {', '.join(opts.encodings)} — re-save it as UTF-8")


def _add_cells(cells: Iterable[str], opts: Options, sink: Sink, batch_chars: int = 1 << 20) -> None:
    """Each cell is a document. Except with ``--unit file``, cells are processed in ~1 MB batches
    joined by blank lines, which gives the same samples with far fewer calls per row."""
    keep = opts.fmt == "jsonl"
    if opts.unit == "file":
        for cell in cells:
            sink.add_all(samples_from_text(cell, "file", keep))
        return
    batch: list[str] = []
    size = 0
    for cell in cells:
        batch.append(cell)
        size += len(cell)
        if size >= batch_chars:
            sink.add_all(samples_from_text("\n\n".join(batch), opts.unit, keep))
            batch, size = [], 0
    if batch:
        sink.add_all(samples_from_text("\n\n".join(batch), opts.unit, keep))


def read_docx(raw: IO[bytes], opts: Options, sink: Sink) -> None:
    """Body paragraphs of a Word file, each a paragraph (tables, headers and notes are not read)."""
    import docx  # lazy: lxml is only needed when there is a .docx

    try:
        document = docx.Document(raw)
    except Exception as err:  # python-docx raises many types for a broken package
        raise SkipFile(f"corrupt or not a .docx ({type(err).__name__}: {err})") from None

    text = "\n\n".join(paragraph.text for paragraph in document.paragraphs)
    sink.add_all(samples_from_text(text, opts.unit, opts.fmt == "jsonl"))


def _is_hidden(name: str) -> bool:
    """Dotfiles and macOS metadata (``._x.txt`` is binary despite its name)."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/") if part)


def read_zip(task: Task, opts: Options, sink: Sink, result: TaskResult) -> None:
    """Read supported members in name order, in memory; a bad member is skipped, not the archive."""
    try:
        archive = zipfile.ZipFile(task.path)
    except zipfile.BadZipFile as err:
        raise SkipFile(f"corrupt zip archive ({err})") from None
    with archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            rel = f"{task.rel}::{info.filename}"
            kind = KINDS.get(Path(info.filename).suffix.lower())
            if _is_hidden(info.filename):
                result.ignored.append("(hidden)")
                continue
            if kind in (None, "zip"):  # nested archives are not opened
                result.ignored.append(Path(info.filename).suffix.lower() or "(none)")
                continue
            mark = sink.mark()
            try:
                enc = _read_member(archive, info, kind, opts, sink)
            except Exception as err:
                sink.rollback(mark)
                result.skipped.append((rel, _reason(err)))
                continue
            if enc:
                result.encodings.append((rel, enc))


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, kind: str,
                 opts: Options, sink: Sink) -> str | None:
    def open_raw() -> IO[bytes]:
        return archive.open(info)

    if kind == "txt":
        with open_raw() as raw:
            head = raw.read(8192)
        utf16 = head[:2] in _UTF16_BOMS
        if not utf16 and b"\x00" in head:
            raise SkipFile(_BINARY)
        return read_text_stream(open_raw, ("utf-16",) if utf16 else opts.encodings, opts, sink)
    if kind == "csv":
        return read_csv_stream(open_raw, opts, sink)
    read_docx(io.BytesIO(archive.read(info)), opts, sink)
    return None


def _reason(err: BaseException) -> str:
    if isinstance(err, SkipFile):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        return f"cannot read: {err.strerror}"
    return f"{type(err).__name__}: {err}"


def run_task(task: Task, opts: Options) -> TaskResult:
    """Worker entry point. Never raises: a failure becomes `TaskResult.error`."""
    result = TaskResult(task)
    sink = Sink(opts)
    try:
        if task.error:
            raise SkipFile(task.error)
        if task.kind == "txt":
            result.encodings.append((task.rel, read_txt_task(task, opts, sink)))
        elif task.kind == "csv":
            result.encodings.append((task.rel, read_csv_stream(partial(open, task.path, "rb"), opts, sink)))
        elif task.kind == "docx":
            with open(task.path, "rb") as raw:
                read_docx(raw, opts, sink)
        else:
            read_zip(task, opts, sink, result)
    except Exception as err:
        sink.close(discard=True)
        result.error = _reason(err)
        return result
    sink.close()
    result.blobs, result.spill = sink.blobs, sink.spill_path
    result.samples, result.short = sink.samples, sink.short
    return result


# --- planning -----------------------------------------------------------------------------------

def discover(raw_dir: Path, exclude: Iterable[Path] = ()
             ) -> tuple[list[Path], Counter, list[tuple[str, str]]]:
    """Supported files under `raw_dir` sorted by relative path, a count of ignored ones by
    extension, and the folders that could not be listed (with the reason)."""
    skip = {p.resolve() for p in exclude}
    skip_names = {p.name for p in skip}
    files: list[Path] = []
    ignored: Counter = Counter()
    unlisted: list[tuple[str, str]] = []

    def on_error(err: OSError) -> None:
        where = Path(err.filename).relative_to(raw_dir).as_posix() if err.filename else str(raw_dir)
        unlisted.append((where + "/", _reason(err)))

    for root, dirs, names in os.walk(raw_dir, onerror=on_error):
        hidden = [d for d in dirs if _is_hidden(d)]
        ignored["(hidden)"] += len(hidden)
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        for name in names:
            path = Path(root, name)
            ext = path.suffix.lower()
            if _is_hidden(name):
                ignored["(hidden)"] += 1
            elif ext not in KINDS:
                ignored[ext or "(none)"] += 1
            elif name not in skip_names or path.resolve() not in skip:
                files.append(path)
    files.sort(key=lambda p: p.relative_to(raw_dir).as_posix())
    return files, +ignored, sorted(unlisted)


def find_cut(fh: IO[bytes], pos: int, size: int) -> int:
    """Where a range that nominally ends at `pos` should end instead: just after the next blank line
    (so paragraphs stay whole), else after the next newline, else after the next space, else at EOF
    if that is close. Only ASCII bytes are cut after, so no multi-byte character is split (this also
    holds for GB18030, whose trailing bytes are never a newline or space)."""
    window = b""
    for limit in (64 << 10, CUT_SLACK):
        fh.seek(pos)
        window = fh.read(limit)
        match = _BLANK_LINE.search(window)
        if match:
            return pos + match.end()
    if pos + len(window) >= size:
        return size
    for sep in (b"\n", b" ", b"\t"):
        found = window.find(sep)
        if found >= 0:
            return pos + found + 1
    step = 0
    while step < 3 and window[step] & 0xC0 == 0x80:  # step off UTF-8 continuation bytes
        step += 1
    return pos + step


def plan_tasks(files: Iterable[Path], raw_dir: Path, chunk_bytes: int) -> Iterator[Task]:
    """Tasks in output order; a .txt file larger than `chunk_bytes` becomes several ranges."""
    for path in files:
        rel = path.relative_to(raw_dir).as_posix()
        kind = KINDS[path.suffix.lower()]
        start, part = 0, 0
        try:
            size = path.stat().st_size
            if kind != "txt" or size <= chunk_bytes:
                yield Task(str(path), rel, kind, 0, size)
                continue
            with open(path, "rb") as fh:
                if fh.read(2) in _UTF16_BOMS:  # streamed whole: cutting at b"\n" would split UTF-16
                    yield Task(str(path), rel, kind, 0, size)
                    continue
                while start < size:
                    end = size if start + chunk_bytes >= size else find_cut(fh, start + chunk_bytes, size)
                    yield Task(str(path), rel, kind, start, end, part, end >= size)
                    start, part = end, part + 1
        except OSError as err:
            yield Task(str(path), rel, kind, start, start, part, True, error=_reason(err))


# --- execution ----------------------------------------------------------------------------------

def iter_results(tasks: Iterable[Task], opts: Options, num_workers: int) -> Iterator[TaskResult]:
    """Run tasks and yield results in task order, keeping only a small window in flight so memory
    stays bounded however far ahead the workers could run."""
    if num_workers <= 1:
        for task in tasks:
            yield run_task(task, opts)
        return
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        pending: deque[tuple[Task, Future]] = deque()
        try:
            for task in tasks:
                pending.append((task, pool.submit(run_task, task, opts)))
                if len(pending) >= 2 * num_workers + 2:
                    yield pending[0][1].result()
                    pending.popleft()
            while pending:
                yield pending[0][1].result()
                pending.popleft()
        except BrokenProcessPool:  # a hard crash (OOM kill, segfault), not an exception in a reader
            raise fail("--num-workers", "", f"a worker process died (killed for memory?) near {pending[0][0].rel}",
                       "rerun with fewer workers, or with --num-workers 1 to find the file") from None
        finally:
            for _, future in pending:
                future.cancel()


def _blobs(result: TaskResult, size: int = 4 << 20) -> Iterator[bytes]:
    """A result's output as blobs of whole records; a spill file is read back piece by piece."""
    yield from result.blobs
    if result.spill:
        with open(result.spill, "rb") as fh:
            carry = b""
            while piece := fh.read(size):
                piece = carry + piece
                cut = piece.rfind(b"\n") + 1
                carry = piece[cut:]
                yield piece[:cut]
        os.unlink(result.spill)


class _Collector:
    """Writes results in order and keeps the report: dedup, per-file status, encodings, progress."""

    def __init__(self, out: IO[bytes], report: PreprocessReport, dedup: bool, progress):
        self.out, self.report, self.progress = out, report, progress
        self.seen: set[int] | None = set() if dedup else None
        self.failed: set[str] = set()
        self.file_encodings: dict[str, set[str]] = {}

    def add(self, result: TaskResult) -> None:
        task, report = result.task, self.report
        self.progress.update(task.end - task.start)
        if task.rel in self.failed:
            self._discard(result)
        elif result.error:
            self._fail(task, result.error)
        else:
            self._write(result)
            report.short_dropped += result.short
            report.bytes_in += task.end - task.start
            report.files_skipped += result.skipped
            report.files_ignored += len(result.ignored)
            for ext in result.ignored:
                report.ignored_by_ext[ext] = report.ignored_by_ext.get(ext, 0) + 1
            for rel, enc in result.encodings:
                self.file_encodings.setdefault(rel, set()).add(enc)
        if task.last:
            self._finish_file(task.rel)

    def _write(self, result: TaskResult) -> None:
        if self.seen is None:
            for blob in _blobs(result):
                self.out.write(blob)
            self.report.samples_written += result.samples
            return
        for blob in _blobs(result):
            kept = self._unseen(blob.split(b"\n")[:-1])
            if kept:
                self.out.write(b"\n".join(kept) + b"\n")
            self.report.samples_written += len(kept)
            self.report.duplicates_dropped += blob.count(b"\n") - len(kept)

    def _unseen(self, records: list[bytes]) -> list[bytes]:
        """Records not seen before (first occurrence wins). Only an 8-byte BLAKE2b digest of each is
        kept, as an int: memory grows ~70 bytes per unique sample, not with the text."""
        seen, kept = self.seen, []
        for record in records:
            digest = int.from_bytes(hashlib.blake2b(record, digest_size=8).digest(), "little")
            if digest not in seen:
                seen.add(digest)
                kept.append(record)
        return kept

    def _fail(self, task: Task, reason: str) -> None:
        if task.part:
            reason += f" (in bytes {task.start}-{task.end}; the {task.part} range(s) before it were kept)"
        self.report.files_skipped.append((task.rel, reason))
        self.failed.add(task.rel)

    @staticmethod
    def _discard(result: TaskResult) -> None:
        if result.spill:
            os.unlink(result.spill)

    def _finish_file(self, rel: str) -> None:
        encodings = self.file_encodings.pop(rel, set())
        for member in [m for m in self.file_encodings if m.startswith(rel + "::")]:
            self._note_encoding(member, self.file_encodings.pop(member))
        if rel in self.failed:
            self.failed.discard(rel)
        else:
            self._note_encoding(rel, encodings)
            self.report.files_read += 1
        self.progress.set_postfix(files=self.report.files_read, refresh=False)

    def _note_encoding(self, rel: str, encodings: set[str]) -> None:
        others = sorted(e for e in encodings if codecs.lookup(e).name != "utf-8")
        if others:
            self.report.fallback_encodings.append((rel, "+".join(others)))


def _check_paths(raw_dir: Path, out_file: Path, overwrite: bool) -> None:
    if not raw_dir.exists():
        raise fail(f"--raw-dir {raw_dir}", "", "directory not found", "pass an existing folder")
    if not raw_dir.is_dir():
        raise fail(f"--raw-dir {raw_dir}", "", "not a directory", "pass the folder that holds the raw files")
    if out_file.is_dir():
        raise fail(f"--out-file {out_file}", "", "is a directory", "pass a file path")
    if out_file.exists() and not overwrite:
        raise fail(f"--out-file {out_file}", "", "already exists", "pass --overwrite to replace it")
    if why := unwritable(out_file):
        raise fail(f"--out-file {out_file}", "", why, "choose a path you can write to")


def _check_encodings(encodings: Sequence[str]) -> tuple[str, ...]:
    for name in encodings:
        try:
            codecs.lookup(name)
        except LookupError:
            raise fail(f"--encodings {name}", "", "unknown encoding", "use names like utf-8,gb18030,latin-1") from None
    if not encodings:
        raise fail("--encodings", "", "empty", "give at least one encoding, e.g. utf-8")
    return tuple(encodings)


def _open_temp(out_file: Path) -> tuple[Path, IO[bytes]]:
    """A new temp file next to `out_file` (same filesystem, so os.replace is atomic), umask-respecting."""
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, os.fdopen(fd, "wb", buffering=1 << 20)


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess",
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def preprocess(raw_dir: str | os.PathLike, out_file: str | os.PathLike, *, num_workers: int = 1,
               fmt: str = "txt", unit: str = "paragraph", dedup: bool = False, min_chars: int = 0,
               csv_column: str = "text", overwrite: bool = False,
               encodings: Sequence[str] = DEFAULT_ENCODINGS, quiet: bool = True,
               chunk_bytes: int = CHUNK_BYTES, spill_bytes: int = SPILL_BYTES) -> PreprocessReport:
    """Preprocess every supported file under `raw_dir` into `out_file`; see the module docstring.

    Raises `lora_ns.errors.UserError` (messages name the CLI flags) for bad arguments or when no
    file could be read; then nothing is written. `chunk_bytes` and `spill_bytes` exist for tests.
    """
    raw_dir, out_file = Path(raw_dir), Path(out_file)
    if fmt not in FORMATS or unit not in UNITS:
        raise fail("--format/--unit", "", f"got {fmt!r}/{unit!r}", f"use one of {FORMATS} / {UNITS}")
    _check_paths(raw_dir, out_file, overwrite)
    encodings = _check_encodings(encodings)
    files, ignored, unlisted = discover(raw_dir, exclude=[out_file])
    if not files:
        raise fail(f"--raw-dir {raw_dir}", "", f"no .txt/.csv/.docx/.zip files found ({sum(ignored.values())} "
                   "other files ignored)", "put the raw documents in this folder")
    report = PreprocessReport(out_file=str(out_file), files_ignored=sum(ignored.values()),
                              ignored_by_ext=dict(ignored), files_skipped=unlisted)
    opts = Options(fmt, unit, min_chars, csv_column, encodings, None, spill_bytes, chunk_bytes)
    started = time.perf_counter()
    created = _make_parents(out_file.parent)
    try:
        _write_atomically(out_file, lambda out, spill_dir: _process(
            out, files, raw_dir, replace(opts, spill_dir=spill_dir), num_workers, dedup, quiet, report))
    except BaseException:
        for folder in reversed(created):  # leave no empty output folder behind either
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    report.seconds = time.perf_counter() - started
    return report


def _process(out: IO[bytes], files: list[Path], raw_dir: Path, opts: Options, num_workers: int,
             dedup: bool, quiet: bool, report: PreprocessReport) -> None:
    """Run every task and write the results in order; refuse to finish if no file was readable."""
    with _progress(sum(_size(p) for p in files), quiet) as bar:
        collector = _Collector(out, report, dedup, bar)
        for result in iter_results(plan_tasks(files, raw_dir, opts.block_chars), opts, num_workers):
            collector.add(result)
    if report.files_read == 0:
        path, reason = report.files_skipped[0] if report.files_skipped else ("", "")
        raise fail(f"--raw-dir {raw_dir}", "", f"no readable files: all {len(files)} were skipped "
                   f"(first: {path}: {reason})", "fix or remove the broken files")


def _write_atomically(out_file: Path, write: Callable[[IO[bytes], str], None]) -> None:
    """Call `write(fh, spill_dir)` on a temp file next to `out_file`, then move it into place.
    On any error the temp file and the spill folder are removed and `out_file` is untouched."""
    tmp, out = _open_temp(out_file)
    spill_dir = ""
    try:
        spill_dir = tempfile.mkdtemp(prefix=f".{out_file.name}.spill-", dir=out_file.parent)
        with out:
            write(out, spill_dir)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, out_file)
    finally:
        out.close()
        if spill_dir:
            shutil.rmtree(spill_dir, ignore_errors=True)
        if tmp.exists():
            tmp.unlink()


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- command line -------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, description="Clean a folder of .txt/.csv/.docx/.zip files into one text corpus "
        "for continued pretraining (one sample per line, or JSON lines).")
    parser.add_argument("--raw-dir", default="data/raw", help="folder read recursively (default: %(default)s)")
    parser.add_argument("--out-file", default="data/processed/all_text.txt",
                        help="output file (default: %(default)s)")
    parser.add_argument("--num-workers", type=_positive_int, default=_default_workers(),
                        help="worker processes; 1 runs in-process (default: min(4, CPUs) = %(default)s)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="txt",
                        help="txt: one sample per line; jsonl: {\"text\": ...} per line, line breaks kept")
    parser.add_argument("--unit", choices=UNITS, default="paragraph",
                        help="one sample per blank-line-separated paragraph, per document (a file or a CSV "
                        "row), or per line (default: %(default)s)")
    parser.add_argument("--csv-column", default="text", help="CSV column holding the text (default: %(default)s)")
    parser.add_argument("--dedup", action="store_true", help="drop exact duplicate samples (keeps the first)")
    parser.add_argument("--min-chars", type=_non_negative_int, default=0,
                        help="drop samples shorter than this many characters (default: %(default)s)")
    parser.add_argument("--encodings", default=",".join(DEFAULT_ENCODINGS),
                        help="encodings tried in order for text and CSV (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out-file if it exists")
    parser.add_argument("--report-file", help="also write the report as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # a usage error is one UserError line (OneLineParser); --help exits 0
        return run_cli(PROG, lambda: _run(make_parser().parse_args(argv)))
    except SystemExit as exc:
        return int(exc.code or 0)


def _run(args: argparse.Namespace) -> int:
    report = preprocess(
        args.raw_dir, args.out_file, num_workers=args.num_workers, fmt=args.fmt, unit=args.unit,
        dedup=args.dedup, min_chars=args.min_chars, csv_column=args.csv_column, overwrite=args.overwrite,
        encodings=[e.strip() for e in args.encodings.split(",") if e.strip()], quiet=args.quiet)
    if args.report_file:
        Path(args.report_file).write_text(json.dumps(report.to_json(), ensure_ascii=False, indent=2) + "\n",
                                          encoding="utf-8")
    print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
