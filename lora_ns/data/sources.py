"""Where a split's rows come from (the Hub, or local files: file, glob, folder, ``sample:<name>``), and a
reader of local files that names each row by ``file:line``.

`datasets`' builders load JSON, Parquet and text but name no line, so this reader locates the row a builder
choked on, one a formatter rejects and the rows `validate` samples. CSV/TSV it reads alone (`loading` feeds
it to `datasets`): datasets' pandas builder fills a short row with '' (no error to locate), keeps one of two
same-named columns, takes a stray quote and turns "007" into 7.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
from itertools import islice
from pathlib import Path
from typing import IO, Any, Iterator, NamedTuple

from lora_ns.config import DatasetConfig
from lora_ns.errors import fail, suggest

SAMPLE_PREFIX = "sample:"
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".txt": "text"}
BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "text": "text"}  # CSV/TSV: `rows`
# ``sample:text`` is the continued-pretraining corpus; GRPO's gsm8k_prompt formatter reads the GSM8K sample.
SAMPLE_ALIASES = {"text": "cpt_text", "gsm8k_prompt": "gsm8k"}


class Location(NamedTuple):
    """A row's file, its line when the format has lines, and its 1-based row in the file."""

    file: str
    line: int | None
    row: int

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line else f"row {self.row}"


class LocalSource(NamedTuple):
    """The files behind one split of a local dataset, all of one format (JSON and JSON lines mix)."""

    path: str
    files: tuple[str, ...]
    formats: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.files[0] if len(self.files) == 1 else self.path

    @property
    def delimited(self) -> bool:
        return self.formats[0] in ("csv", "tsv")


# --- finding the files ------------------------------------------------------------------------------

def resolve_sample(path: str) -> str:
    """``sample:gsm8k`` -> the bundled file's path; other paths unchanged."""
    if not path.startswith(SAMPLE_PREFIX):
        return path
    name = SAMPLE_ALIASES.get(path[len(SAMPLE_PREFIX):], path[len(SAMPLE_PREFIX):])
    found = sorted(p for p in SAMPLES_DIR.glob(f"{glob.escape(name)}.*") if p.suffix in EXTENSIONS)
    if not found:
        names = sorted({p.stem for p in SAMPLES_DIR.iterdir() if p.suffix in EXTENSIONS})
        raise fail(path, "dataset.path", f"no bundled sample named '{name}'",
                   suggest(name, names))
    return str(found[0])


def looks_local(path: str) -> bool:
    """True for sample:, existing paths, globs and anything shaped like a file path (not ``owner/name``)."""
    if path.startswith(SAMPLE_PREFIX) or os.path.exists(os.path.expanduser(path)):
        return True
    if any(c in path for c in "*?[\\") or path.startswith((".", "/", "~")):
        return True
    return _extension(path) in EXTENSIONS or path.count("/") >= 2


def _extension(path: str) -> str:
    suffixes = [s for s in Path(path).suffixes if s != ".gz"][-1:]
    return suffixes[0].lower() if suffixes else ""


def find_files(path: str, split: str | None = None, field: str = "dataset.path") -> list[str]:
    """The data files `path` names; in a folder, those of `split` (None: train) by `datasets`' own rules for
    split file names (train.jsonl, validation-00.jsonl, dev.csv, ...; no such names: every file is train)."""
    resolved = os.path.expanduser(resolve_sample(path))
    if split is not None and not os.path.isdir(resolved):
        if field == "dataset.path":  # the training split: dataset.split named it
            raise fail(path, "dataset.split", f"'{split}' is not a split of a local file (it is all one "
                       "split)", f"remove dataset.split, or point dataset.path at a folder holding "
                       f"{split}.jsonl")
        raise fail(path, field, f"'{split}' is not a split of a local file", "give the validation data its "
                   "own file (dataset.val_split: path/to/val.jsonl) or a fraction (dataset.val_split: 0.1)")
    if any(c in resolved for c in "*?["):
        files = sorted(f for f in glob.glob(resolved, recursive=True)
                       if os.path.isfile(f) and _extension(f) in EXTENSIONS)
        if not files:
            raise fail(path, field, "no data files match this pattern", "check the glob (e.g. data/*.jsonl)")
        return files
    target = Path(resolved)
    if target.is_file():
        return [str(target)]
    if not target.is_dir():
        raise fail(path, field, "file not found", "check the path (relative paths start from where you run)")
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    want = split or "train"
    try:
        patterns = get_data_patterns(str(target))
    except EmptyDatasetError:
        patterns = {}
    found = DataFilesDict.from_patterns({want: patterns[want]}, str(target))[want] if want in patterns else []
    files = sorted(str(target / os.path.relpath(f, os.path.abspath(target))) for f in found
                   if _extension(f) in EXTENSIONS)  # datasets' paths are absolute; keep the recipe's
    if not files:
        raise fail(path, field, f"folder has no data files for split '{want}'", f"add {'/'.join(EXTENSIONS)} "
                   f"files, named {want}.jsonl (or {want}-*.jsonl) when others are named by split")
    return files


def file_format(file: str, data_format: str | None = None) -> str:
    """jsonl | json | csv | tsv | parquet | text, from `data_format` or the extension; a .json file holding
    a list is JSON, anything else JSON lines."""
    fmt = data_format or EXTENSIONS.get(_extension(file))
    if fmt is None:
        raise fail(file, "dataset.path", f"unknown data file type '{_extension(file) or Path(file).name}'",
                   "use .jsonl/.json/.csv/.tsv/.parquet/.txt, or set dataset.data_format")
    if fmt in ("json", "jsonl"):
        with _open(file) as f:
            start = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
        return "json" if start.startswith("[") else "jsonl"
    return fmt


class HubSource(NamedTuple):
    path: str
    name: str | None
    split: str
    revision: str | None


Source = LocalSource | HubSource


def source_for(cfg: DatasetConfig, split: str | None = None, field: str = "dataset.path") -> Source:
    """Where one split's rows come from; `split` None means the training split (``cfg.split``)."""
    if split is not None and not split.isidentifier() and looks_local(split):  # a bare word is a split
        return local_source(split, None, cfg.data_format, field)
    if looks_local(cfg.path):
        wanted = split if split is not None else (None if cfg.split == "train" else cfg.split)
        return local_source(cfg.path, wanted, cfg.data_format, field)
    return HubSource(cfg.path, cfg.name, split or cfg.split, cfg.revision)


def local_source(path: str, split: str | None = None, data_format: str | None = None,
                 field: str = "dataset.path") -> LocalSource:
    files = find_files(path, split, field)
    formats = tuple(file_format(f, data_format) for f in files)
    if len({BUILDERS.get(f, f) for f in formats}) > 1:
        raise fail(path, field, f"mixes file types ({', '.join(sorted(set(formats)))})",
                   "keep one format per dataset, or narrow the glob")
    return LocalSource(path, tuple(files), formats)


# --- reading rows with their lines -------------------------------------------------------------------

def _open(file: str) -> IO[bytes]:
    return gzip.open(file, "rb") if file.endswith(".gz") else open(file, "rb")


def _line_rows(f: IO[bytes], file: str, fmt: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """JSON lines (blank lines skipped) or text (one row per line)."""
    for number, raw in enumerate(f, 1):
        try:
            text = raw.decode("utf-8").lstrip("\ufeff" if number == 1 else "")
        except UnicodeDecodeError as err:
            raise fail(file, "", f"not UTF-8 text (byte {err.start + 1} of the line)",
                       "re-save the file as UTF-8", number)
        if fmt == "text":
            yield number, {"text": text.rstrip("\r\n")}
        elif text.strip():
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                fix = "fix or remove that line (one JSON object per line)"
                if number == 1 and not text.lstrip().startswith(("{", "[")):
                    fix = "if the file is CSV/TSV/text, set dataset.data_format to csv, tsv or text"
                if number == 1 and (why := _one_object(file)):  # a JSON document, not JSON lines
                    raise fail(file, "", why, "write the rows as a JSON list of objects, or as JSON lines")
                raise fail(file, "", f"not valid JSON: {err.msg} (column {err.colno})", fix, number)
            if not isinstance(row, dict):
                raise fail(file, "", f"expected a JSON object, got {type(row).__name__}",
                           "write one {\"column\": value, ...} object per line", number)
            yield number, row


def _one_object(file: str) -> str | None:
    """What a file that fails as JSON lines holds when it is one JSON object spread over lines (a JSON
    document, perhaps with its rows under a key, as SQuAD's 'data'), or None."""
    try:
        with _open(file) as f:
            data = json.loads(f.read().decode("utf-8-sig"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    key = next((k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)), None)
    return "holds one JSON object, not rows" + (f" (they seem to sit under '{key}')" if key else "")


def _json_rows(f: IO[bytes], file: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
    try:
        data = json.loads(f.read().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise fail(file, "", f"not valid JSON: {getattr(err, 'msg', err)}", "fix the file",
                   getattr(err, "lineno", None))
    if not isinstance(data, list):
        raise fail(file, "", "a .json file must hold a list of objects", "or write JSON lines (.jsonl)")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise fail(file, "", f"row {i}: expected a JSON object, got {type(row).__name__}",
                       "fix that item")
        yield None, row


def _delimited_rows(f: IO[bytes], file: str, tsv: bool) -> Iterator[tuple[int | None, dict[str, Any]]]:
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    # strict: an unclosed quote is an error at the line it opened on, not the rest of the file as one field
    reader = csv.reader(text, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else \
        csv.reader(text, strict=True)
    start = 1
    try:
        header = next(reader, [])
        if duplicated := sorted({h for h in header if header.count(h) > 1}):
            raise fail(file, "", f"duplicate column name(s) in the header: {', '.join(duplicated)}",
                       "give every column a distinct name", 1)
        start = reader.line_num + 1
        for record in reader if any(h.strip() for h in header) else ():
            if record and len(record) != len(header):
                raise fail(file, "", f"row has {len(record)} fields but the header has {len(header)}",
                           "a tab inside a field splits it" if tsv else "quote fields with commas", start)
            if record:
                yield start, dict(zip(header, record))
            start = reader.line_num + 1
    except UnicodeDecodeError:
        raise fail(file, "", "not UTF-8 text", "re-save the file as UTF-8", reader.line_num + 1)
    except csv.Error as err:
        unclosed = "unexpected end of data" in str(err)
        message = "a quoted field opens on this line and never closes" if unclosed else \
            f"malformed {'TSV' if tsv else 'CSV'}: {err}"
        raise fail(file, "", message, 'close the quote; a quote inside a field is written ""',
                   start if unclosed else reader.line_num)


def rows(file: str, fmt: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """(line or None, row) for each row of one file; malformed content raises a one-line `UserError`."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(file).iter_batches(batch_size=256)
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise fail(file, "", f"not a readable Parquet file: {str(err).splitlines()[0]}",
                       "re-export the file")
        yield from ((None, row) for batch in batches for row in batch.to_pylist())
        return
    with _open(file) as f:
        if fmt == "json":
            yield from _json_rows(f, file)
        elif fmt in ("csv", "tsv"):
            yield from _delimited_rows(f, file, fmt == "tsv")
        else:
            yield from _line_rows(f, file, fmt)


def located_rows(source: LocalSource) -> Iterator[tuple[Location, dict[str, Any]]]:
    """Every row of every file, in the order the builders load them, with its `Location`; a file with no rows
    is an error (a builder skips one in a glob)."""
    for file, fmt in zip(source.files, source.formats):
        number = 0
        for number, (line, row) in enumerate(rows(file, fmt), 1):
            yield Location(file, line, number), row
        if not number:
            raise fail(file, "", "no rows: the file is empty",
                       "add data, or remove the file from dataset.path")


def first_rows(source: LocalSource) -> None:
    """Read each file's first row: an empty file or a malformed first row fails before a builder runs."""
    for file, fmt in zip(source.files, source.formats):
        next(located_rows(source._replace(files=(file,), formats=(fmt,))))


def locate(src: Source, index: int) -> Location:
    """The `Location` of the row at 0-based `index` of the loaded source (of a Hub row: its number)."""
    if isinstance(src, LocalSource):
        for where, _ in islice(located_rows(src), index, index + 1):
            return where
    return Location(src.path, None, index + 1)
