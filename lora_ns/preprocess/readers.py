"""Readers for .txt/.csv/.docx/.zip and the text normalization: everything that runs inside a worker.

A reader yields output rows: ``{"data": bytes}`` holds records, and a ``{"note": json}`` row closes a
unit of work (a decode attempt, an archive member, a task). The parent keeps or takes back the rows
since the previous note, so no reader holds more than one block (~4 MiB) of text, however large its
source, except with ``--unit file``: there a whole file is one sample.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from json.encoder import encode_basestring
from pathlib import Path
from typing import IO

KINDS = (".txt", ".csv", ".docx", ".zip")
UNITS = ("paragraph", "file", "line")
DEFAULT_ENCODINGS = ("utf-8", "gb18030", "latin-1")
CHUNK_BYTES = 4 << 20  # nominal size of one range of a large .txt file, and of one streamed block
CUT_SLACK = 1 << 20  # how far past the nominal end we look for a blank line to cut at
CSV_FIELD_LIMIT = 16 << 20  # one CSV cell; an unclosed quote then fails fast instead of eating RAM
BINARY = "binary data (NUL bytes; UTF-16 without a BOM?) — not a text file"
NO_DOCX = "reading .docx needs python-docx — pip install lora_ns[preprocess]"
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# Scripts written without spaces between words: Han, kana, bopomofo, CJK punctuation and
# fullwidth forms. Hangul is left out on purpose (Korean separates words with spaces).
_CJK = ("[\u2e80-\u2fdf\u3001-\u303f\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3200-\u4dbf"
        "\u4e00-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uff9f\uffe0-\uffe6\U00020000-\U0003ffff]")
# A line break with a CJK character on both sides; the literal "\n" first lets the engine skip ahead.
_CJK_BREAK = re.compile(f"\n(?<={_CJK}\n)(?={_CJK})")
_SINGLE_BREAK = re.compile(r"\n(?<!\n\n)(?!\n)")  # a line break that is not part of a blank line
_BLANK_RUN = re.compile(r"\n\n+")


class SkipFile(Exception):
    """A source cannot be read; the message is the reason shown in the report."""


@dataclass(frozen=True)
class Options:
    """Per-run settings shipped to every worker."""

    fmt: str = "txt"
    unit: str = "paragraph"
    min_chars: int = 0
    csv_column: str = "text"
    encodings: tuple[str, ...] = DEFAULT_ENCODINGS
    block_chars: int = CHUNK_BYTES  # streamed sources (archive members, CSV, UTF-16) are cut into blocks


class Rows:
    """One task's output rows: text becomes samples, then one blob of newline-terminated records."""

    def __init__(self, opts: Options):
        self.opts, self.short, self.ignored = opts, 0, []
        self.unit, self.keep = opts.unit, opts.fmt == "jsonl"  # samples_from_text's arguments

    def data(self, samples: list[str]) -> list[dict]:
        """Called as ``data(samples_from_text(text, ...))``: the text (often the only reference, as
        the call's argument) is freed before the samples are joined, which keeps the peak memory low."""
        if self.opts.min_chars:
            kept = [s for s in samples if len(s) >= self.opts.min_chars]
            self.short, samples = self.short + len(samples) - len(kept), kept
        if not samples:
            return []
        if self.opts.fmt == "jsonl":  # same bytes as json.dumps({"text": s}, ensure_ascii=False), faster
            text = '{"text": ' + '}\n{"text": '.join(map(encode_basestring, samples)) + "}\n"
        else:
            text = "\n".join(samples) + "\n"
        return [{"data": text.encode("utf-8"), "note": None}]

    def end(self, kind: str, **note) -> dict:
        """Close a unit: ``retry`` (take its rows back), ``member`` or ``task`` (keep them unless
        ``error``)."""
        note.update(kind=kind, short=self.short)
        self.short = 0
        return {"data": None, "note": json.dumps(note, ensure_ascii=False)}


def samples_from_text(text: str, unit: str, keep_newlines: bool) -> list[str]:
    """Split text into normalized samples: one per line, per blank-line-separated paragraph, or one
    for the whole text. Inside a line every run of whitespace becomes one space and lines are
    stripped. With `keep_newlines` (jsonl) a sample keeps its line breaks (paragraphs separated by
    one blank line); otherwise it is flattened to one line, where a break between two CJK
    characters is dropped (a hard-wrapped Chinese sentence must not gain spaces) and any other
    break becomes a space. Whole-block string and regex operations: this is the hot path.
    """
    if "\r" in text:  # CRLF and CR become LF; NULs and stray BOMs (concatenated files) go
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text or "\ufeff" in text:
        text = text.replace("\x00", "").replace("\ufeff", "")
    text = "\n".join([" ".join(line.split()) for line in text.split("\n")])
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


def text_blocks(stream: IO[str], size: int, unit: str) -> Iterator[str]:
    """Blocks of about `size` characters, each cut just after its last blank line (so no paragraph is
    split; looking back at most CUT_SLACK), else after its last newline, else not cut. With unit "file"
    the one block is the whole text: it is one sample."""
    if unit == "file":
        yield stream.read()
        return
    carry = ""
    while chunk := stream.read(size):
        block = carry + chunk
        last = i = block.rfind("\n")
        cut = last if last >= 0 else len(block) - 1  # no newline at all: the block is not cut
        while unit != "line" and i > 0 and last - i < CUT_SLACK:
            j = block.rfind("\n", 0, i)
            if j + 1 == i or block[j + 1:i].isspace():
                cut = i
                break
            i = j
        carry = block[cut + 1:]
        yield block[:cut + 1]
    if carry:
        yield carry


def find_cut(fh: IO[bytes], pos: int, size: int) -> int:
    """Where a range that nominally ends at `pos` should end instead: just after the next blank line
    (so paragraphs stay whole), else after the next newline, else after the next space, else at EOF
    if that is close. Only ASCII bytes are cut after, so no multi-byte character is split (this also
    holds for GB18030, whose trailing bytes are never a newline or space)."""
    window = b""
    for limit in (64 << 10, CUT_SLACK):
        fh.seek(pos)
        window = fh.read(limit)
        if match := _BLANK_LINE.search(window):
            return pos + match.end()
    if pos + len(window) >= size:
        return size
    for sep in (b"\n", b" ", b"\t"):
        if (found := window.find(sep)) >= 0:
            return pos + found + 1
    step = 0
    while step < 3 and window[step] & 0xC0 == 0x80:  # step off UTF-8 continuation bytes
        step += 1
    return pos + step


def is_utf16(path: str | Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) in _UTF16_BOMS


def is_hidden(name: str) -> bool:
    """Dotfiles and macOS metadata (``._x.txt`` is binary despite its name)."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/") if part)


def reason(err: BaseException) -> str:
    if isinstance(err, SkipFile):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        return f"cannot read: {err.strerror}"
    return f"{type(err).__name__}: {err}"


# --- readers: generators of rows that return the encoding they used, if any ------------------

def generate(shards: list[list], opts: Options) -> Iterator[dict]:
    """The `datasets` generator (runs in a worker): every task's rows, each task closed by a ``task``
    row. A task is a byte range of a .txt file (a small file is one range) or a whole file of another
    kind (or UTF-16, streamed). Never raises for a bad file: the failure goes into that row."""
    for task in (task for shard in shards for task in shard):
        rows, ext = Rows(opts), Path(task.path).suffix.lower()
        try:
            if ext == ".zip":
                enc = yield from _read_zip(task.path, task.rel, rows)
            elif ext != ".txt" or (task.start == 0 and is_utf16(task.path)):
                enc = yield from _read_source(ext, partial(open, task.path, "rb"), rows)
            else:
                enc = yield from _read_range(task.path, task.start, task.end, rows)
            yield rows.end("task", enc=enc, ignored=rows.ignored)
        except Exception as err:
            yield rows.end("task", error=reason(err))


def _read_range(path: str, start: int, end: int, rows: Rows) -> Iterator[dict]:
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    if start == 0 and b"\x00" in data[:8192]:
        raise SkipFile(BINARY)
    def attempt(codec: str) -> list[dict]:
        return rows.data(samples_from_text(data.decode(codec), rows.unit, rows.keep))
    return (yield from _fallback(rows.opts.encodings, attempt, rows))


def _fallback(encodings: Iterable[str], attempt: Callable[[str], Iterable[dict]],
              rows: Rows) -> Iterator[dict]:
    """Run `attempt(codec)` with each encoding until one decodes; a failed attempt's rows are taken back
    (a ``retry`` row). UTF-8 goes through utf-8-sig, so a leading BOM is dropped."""
    for name in encodings:
        try:
            yield from attempt("utf-8-sig" if codecs.lookup(name).name == "utf-8" else name)
            return name
        except UnicodeDecodeError:
            yield rows.end("retry")
    raise SkipFile(f"not valid text in {', '.join(encodings)} — re-save it as UTF-8")


def _read_source(ext: str, open_raw: Callable[[], IO[bytes]], rows: Rows) -> Iterator[dict]:
    """A whole file or archive member, streamed in blocks cut at paragraph breaks (`text_blocks`); a .docx
    is read whole (body paragraphs only: no tables, headers or notes)."""
    if ext == ".csv":
        return (yield from _read_csv(open_raw, rows))
    if ext == ".docx":
        try:
            import docx  # optional extra, and lxml is only needed when there is a .docx
        except ImportError:
            raise SkipFile(NO_DOCX) from None
        with open_raw() as raw:
            data = raw.read()
        try:
            document = docx.Document(io.BytesIO(data))
        except Exception as err:  # python-docx raises many types for a broken package
            raise SkipFile(f"corrupt or not a .docx ({type(err).__name__}: {err})") from None
        text = "\n\n".join(paragraph.text for paragraph in document.paragraphs)
        return (yield from rows.data(samples_from_text(text, rows.unit, rows.keep)))
    with open_raw() as raw:
        head = raw.read(8192)
    if head[:2] not in _UTF16_BOMS and b"\x00" in head:
        raise SkipFile(BINARY)

    def attempt(codec: str) -> Iterator[dict]:
        with open_raw() as raw, io.TextIOWrapper(raw, encoding=codec) as stream:
            for block in text_blocks(stream, rows.opts.block_chars, rows.opts.unit):
                yield from rows.data(samples_from_text(block, rows.unit, rows.keep))
    utf16 = head[:2] in _UTF16_BOMS
    return (yield from _fallback(("utf-16",) if utf16 else rows.opts.encodings, attempt, rows))


def _read_csv(open_raw: Callable[[], IO[bytes]], rows: Rows) -> Iterator[dict]:
    """One document per row of the chosen column. Except with ``--unit file``, cells go in ~1 MB
    batches joined by blank lines: the same samples with far fewer calls per row."""
    def attempt(codec: str) -> Iterator[dict]:
        with open_raw() as raw, io.TextIOWrapper(raw, encoding=codec, newline="") as text:
            reader = csv.reader(text)
            try:
                names = [name.strip() for name in next(reader)]
                if (wanted := rows.opts.csv_column) not in names:
                    shown = ", ".join(map(repr, names[:10])) + (", ..." if len(names) > 10 else "")
                    raise SkipFile(f"no column {wanted!r} (columns: {shown}) — pass --csv-column NAME")
                col, batch, size = names.index(wanted), [], 0
                for row in reader:
                    if col < len(row) and row[col]:
                        batch.append(row[col])
                        size += len(row[col])
                    if size >= 1 << 20 or rows.opts.unit == "file":  # file: each cell is one sample
                        yield from rows.data(samples_from_text("\n\n".join(batch), rows.unit, rows.keep))
                        batch, size = [], 0
                yield from rows.data(samples_from_text("\n\n".join(batch), rows.unit, rows.keep))
            except StopIteration:
                raise SkipFile("empty CSV (no header row)") from None
            except csv.Error as err:
                raise SkipFile(f"malformed CSV near line {reader.line_num}: {err}") from None
    csv.field_size_limit(CSV_FIELD_LIMIT)
    return (yield from _fallback(rows.opts.encodings, attempt, rows))


def _read_zip(path: str, rel: str, rows: Rows) -> Iterator[dict]:
    """Supported members in name order, read in memory (never extracted); each member ends with a
    ``member`` row, so a bad one is skipped, not the archive. Nested archives are not opened."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise SkipFile(f"corrupt zip archive ({err})") from None
    with archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            ext = Path(info.filename).suffix.lower()
            if info.is_dir():
                continue
            if is_hidden(info.filename) or ext not in KINDS or ext == ".zip":
                rows.ignored.append("(hidden)" if is_hidden(info.filename) else ext or "(none)")
                continue
            try:
                enc = yield from _read_source(ext, partial(archive.open, info), rows)
                yield rows.end("member", rel=f"{rel}::{info.filename}", enc=enc)
            except Exception as err:
                yield rows.end("member", rel=f"{rel}::{info.filename}", error=reason(err))
