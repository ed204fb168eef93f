"""Local data files: find them (file, glob, folder, ``sample:<name>``) and read their rows with line numbers.

The Hugging Face builders load the data for training (Arrow cache, streaming). This module reads the
same rows, in the same order, with plain Python: `validate` checks a sample in well under a second,
and a row the HF loader or a formatter rejects is reported as ``file:line`` on one line. Rules it
shares with the HF builders: JSON lines skip blank lines; CSV/TSV skip blank lines and read every
cell as text; TSV has no quoting at all (GLUE's files hold unbalanced ``"``); a text file is one row
per line, blank lines included; a UTF-8 BOM is ignored everywhere.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from lora_ns.errors import Problem, UserError

SAMPLE_PREFIX = "sample:"
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".txt": "text"}
# Which HF builder reads each format, and how (every CSV/TSV cell stays text, "NA" included).
BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "tsv": "csv", "parquet": "parquet", "text": "text"}
SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing")}
# Other names for bundled samples: ``sample:text`` is the plain-text (continued pretraining) corpus.
SAMPLE_ALIASES = {"text": "cpt_text", "gsm8k_prompt": "gsm8k"}  # gsm8k_prompt: GRPO reads the GSM8K sample
PEEK_ROWS = 200
_CSV_FIELD_LIMIT = 1 << 26


@dataclass(frozen=True)
class Location:
    """Where a row came from: the file, its line when known (JSON lines, CSV, text), its 1-based row number."""

    file: str
    line: int | None
    row: int

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line else f"row {self.row}"


@dataclass(frozen=True)
class LocalSource:
    """The files behind one split of a local dataset, all in one format family."""

    path: str
    files: tuple[str, ...]
    formats: tuple[str, ...]

    @property
    def builder(self) -> str:
        return BUILDERS[self.formats[0]]

    @property
    def name(self) -> str:
        return self.files[0] if len(self.files) == 1 else self.path

    def builder_kwargs(self, header: list[str]) -> dict[str, Any]:
        """Arguments for ``datasets.load_dataset(self.builder, ...)`` so it reads what `iter_rows` reads."""
        if self.formats[0] in ("csv", "tsv"):
            kwargs: dict[str, Any] = {"encoding": "utf-8-sig", "na_filter": False,
                                      "converters": {name: str for name in header}}
            if self.formats[0] == "tsv":
                kwargs.update(sep="\t", quoting=csv.QUOTE_NONE)
            return kwargs
        if self.formats[0] == "text":
            return {"encoding": "utf-8-sig"}
        return {}


def data_error(file: str, message: str, fix: str = "", line: int | None = None, field: str = "") -> UserError:
    return UserError(Problem(file, field, message, fix, line))


# --- finding the files ------------------------------------------------------------------------------

def sample_names() -> list[str]:
    return sorted({p.stem for p in SAMPLES_DIR.iterdir() if p.suffix in EXTENSIONS})


def resolve_sample(path: str) -> str:
    """``sample:gsm8k`` -> the bundled file's path; other paths unchanged."""
    if not path.startswith(SAMPLE_PREFIX):
        return path
    name = path[len(SAMPLE_PREFIX):]
    name = SAMPLE_ALIASES.get(name, name)
    found = sorted(p for p in SAMPLES_DIR.glob(f"{glob.escape(name)}.*") if p.suffix in EXTENSIONS)
    if not found:
        raise data_error(path, f"no bundled sample named '{name}'", f"use one of: {', '.join(sample_names())}",
                         field="dataset.path")
    return str(found[0])


def looks_local(path: str) -> bool:
    """True for sample:, existing paths, globs and anything shaped like a file path (not ``owner/name``)."""
    if path.startswith(SAMPLE_PREFIX) or os.path.exists(os.path.expanduser(path)):
        return True
    if any(c in path for c in "*?[") or path.startswith((".", "/", "~")) or "\\" in path:
        return True
    return _extension(path) in EXTENSIONS or path.count("/") >= 2


def _extension(path: str) -> str:
    suffixes = Path(path).suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def _split_of(file: Path) -> str | None:
    stem = file.name.split(".")[0].lower()
    for split, names in SPLIT_NAMES.items():
        if any(stem == n or stem.startswith((n + "-", n + "_")) for n in names):
            return split
    return None


def find_files(path: str, split: str | None = None, field: str = "dataset.path") -> list[str]:
    """The data files `path` names. In a folder whose files are named by split (train.jsonl,
    validation.jsonl, ...), `split` picks them; `split` None means the training split (for a file or a
    glob, the only one)."""
    resolved = os.path.expanduser(resolve_sample(path))
    if split is not None and not os.path.isdir(resolved):
        raise data_error(path, f"'{split}' is not a split of a local file",
                         "give the validation data its own file (dataset.val_split: path/to/val.jsonl) "
                         "or a fraction (dataset.val_split: 0.1)", field=field)
    if any(c in resolved for c in "*?["):
        files = sorted(f for f in glob.glob(resolved, recursive=True)
                       if os.path.isfile(f) and _extension(f) in EXTENSIONS)
        if not files:
            raise data_error(path, "no data files match this pattern", "check the glob (e.g. data/*.jsonl)",
                             field=field)
        return files
    target = Path(resolved)
    if target.is_file():
        return [str(target)]
    if not target.is_dir():
        raise data_error(path, "file not found", "check the path (relative paths start from where you run)",
                         field=field)
    files = sorted(p for p in target.rglob("*") if p.is_file() and _extension(str(p)) in EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(target).parts))
    if not files:
        raise data_error(path, "folder holds no data files", f"add {', '.join(EXTENSIONS)} files", field=field)
    by_split = {f: _split_of(f) for f in files}
    if not any(by_split.values()):
        if split in (None, "train"):
            return [str(f) for f in files]
        raise data_error(path, f"folder has no files for split '{split}'",
                         f"name them {split}.jsonl (or {split}-*.jsonl), or point at a file", field=field)
    wanted = [str(f) for f, s in by_split.items() if s == (split or "train")]
    if not wanted:
        raise data_error(path, f"folder has no files for split '{split or 'train'}'",
                         f"name them {split or 'train'}.jsonl (or {split or 'train'}-*.jsonl)", field=field)
    return wanted


def file_format(file: str, data_format: str | None = None) -> str:
    """jsonl | json | csv | tsv | parquet | text, from `data_format` or the extension; a .json file holding
    a list is JSON, anything else JSON lines."""
    fmt = data_format or EXTENSIONS.get(_extension(file))
    if fmt is None:
        raise data_error(file, f"unknown data file type '{_extension(file) or Path(file).name}'",
                         "use .jsonl/.json/.csv/.tsv/.parquet/.txt, or set dataset.data_format", field="dataset.path")
    if fmt in ("json", "jsonl"):
        return "json" if _first_char(file) == "[" else "jsonl"
    return fmt


def _first_char(file: str) -> str:
    with _open(file) as f:
        chunk = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return chunk[:1]


def local_source(path: str, split: str | None = None, data_format: str | None = None,
                 field: str = "dataset.path") -> LocalSource:
    files = find_files(path, split, field)
    formats = tuple(file_format(f, data_format) for f in files)
    builders = {BUILDERS[f] for f in formats}
    if len(builders) > 1 or ({"csv", "tsv"} <= set(formats)):
        raise data_error(path, f"mixes file types ({', '.join(sorted(set(formats)))})",
                         "keep one format per dataset, or narrow the glob", field=field)
    return LocalSource(path, tuple(files), formats)


# --- reading rows -----------------------------------------------------------------------------------

def _open(file: str) -> IO[bytes]:
    return gzip.open(file, "rb") if file.endswith(".gz") else open(file, "rb")


def _decode(raw: bytes, file: str, line: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise data_error(file, f"not UTF-8 text (byte {err.start + 1} of the line)", "re-save the file as UTF-8",
                         line)
    return text.lstrip("\ufeff") if line == 1 else text


def _read_jsonl(file: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
    with _open(file) as f:
        for number, raw in enumerate(f, 1):
            line = _decode(raw, file, number).strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                fix = "if the file is CSV/TSV/text, set dataset.data_format to csv, tsv or text" if number == 1 \
                    and not line.startswith(("{", "[")) else "fix or remove that line (one JSON object per line)"
                raise data_error(file, f"not valid JSON: {err.msg} (column {err.colno})", fix, number)
            if not isinstance(row, dict):
                raise data_error(file, f"expected a JSON object, got {type(row).__name__}",
                                 "write one {\"column\": value, ...} object per line", number)
            yield number, row


def _read_json(file: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
    with _open(file) as f:
        try:
            data = json.loads(f.read().decode("utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            line = getattr(err, "lineno", None)
            raise data_error(file, f"not valid JSON: {getattr(err, 'msg', err)}", "fix the file", line)
    if not isinstance(data, list):
        raise data_error(file, "a .json file must hold a list of objects", "or write JSON lines (.jsonl)")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise data_error(file, f"row {i}: expected a JSON object, got {type(row).__name__}", "fix that item")
        yield None, row


def _read_delimited(file: str, tsv: bool) -> Iterator[tuple[int | None, dict[str, Any]]]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with _open(file) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        reader = csv.reader(text, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(text, strict=True)
        start = 1  # strict: an unclosed quote is an error at its line (not the rest of the file as one field)
        try:
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                return
            if duplicated := sorted({h for h in header if header.count(h) > 1}):
                raise data_error(file, f"duplicate column name(s) in the header: {', '.join(duplicated)}",
                                 "give every column a distinct name", 1)
            start = reader.line_num + 1
            for record in reader:
                if record:
                    if len(record) != len(header):
                        raise data_error(file, f"row has {len(record)} fields but the header has {len(header)}", "a tab "
                                         "inside a field splits it" if tsv else "quote fields with commas", start)
                    yield start, dict(zip(header, record))
                start = reader.line_num + 1
        except UnicodeDecodeError:
            raise data_error(file, "not UTF-8 text", "re-save the file as UTF-8", reader.line_num + 1)
        except csv.Error as err:
            unclosed = "unexpected end of data" in str(err)  # named at the line the quote opened on
            raise data_error(file, "a quoted field opens on this line and never closes" if unclosed else f"malformed "
                             f"{'TSV' if tsv else 'CSV'}: {err}", 'close the quote; a quote inside a field is written ""',
                             start if unclosed else reader.line_num)


def _read_text(file: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
    with _open(file) as f:
        for number, raw in enumerate(f, 1):
            yield number, {"text": _decode(raw, file, number).rstrip("\r\n")}


def _read_parquet(file: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(file)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise data_error(file, f"not a readable Parquet file: {str(err).splitlines()[0]}", "re-export the file")
    for batch in reader.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield None, row


def read_file(file: str, fmt: str) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """(line or None, row) for each row of one file; malformed content raises a one-line `UserError`."""
    if fmt == "jsonl":
        return _read_jsonl(file)
    if fmt == "json":
        return _read_json(file)
    if fmt in ("csv", "tsv"):
        return _read_delimited(file, tsv=fmt == "tsv")
    if fmt == "text":
        return _read_text(file)
    return _read_parquet(file)


def iter_rows(source: LocalSource, limit_per_file: int | None = None) -> Iterator[tuple[Location, dict[str, Any]]]:
    """Rows of every file in order with their `Location`; a file without rows is an error."""
    for file, fmt in zip(source.files, source.formats):
        count = 0
        for line, row in read_file(file, fmt):
            count += 1
            yield Location(file, line, count), row
            if limit_per_file and count >= limit_per_file:
                break
        if count == 0:
            raise data_error(file, "no rows: the file is empty", "add data, or remove the file from dataset.path")


def header(source: LocalSource) -> list[str]:
    """Column names of a CSV/TSV source (union over its files, first-seen order)."""
    names: list[str] = []
    for file, fmt in zip(source.files, source.formats):
        with _open(file) as raw:
            first = raw.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n")
        for name in first.split("\t") if fmt == "tsv" else next(csv.reader([first]), []):
            if name not in names:
                names.append(name)
    return names


def precheck(source: LocalSource, full: bool) -> None:
    """Read the first rows of every file (and, when `full`, every row of CSV/TSV files, whose short rows
    pandas would silently fill with ""): empty files and malformed rows become one-line errors."""
    for _ in iter_rows(source, limit_per_file=PEEK_ROWS):
        pass
    if full and source.builder == "csv":
        find_bad_row(source)


def locate(source: LocalSource, index: int) -> Location:
    """The `Location` of the row at 0-based `index` of the loaded source (as the HF builders order rows)."""
    for i, (where, _) in enumerate(iter_rows(source)):
        if i == index:
            return where
    return Location(source.name, None, index + 1)


def find_bad_row(source: LocalSource) -> None:
    """Read every row (slow path, after the HF loader failed) so a malformed one raises its own error."""
    for _ in iter_rows(source):
        pass
