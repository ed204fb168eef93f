"""``python -m lora_ns.preprocess``: arguments, checks, and `preprocess()`, the function it runs."""

from __future__ import annotations

import argparse
import codecs
import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from lora_ns.command_line import CommandParser
from lora_ns.errors import fail, run_cli
from lora_ns.fileio import unwritable
from lora_ns.preprocess.pipeline import (PROG, PreprocessReport, discover, parents_removed_on_error,
                                         plan_tasks, process, split_by_size)
from lora_ns.preprocess.readers import CHUNK_BYTES, DEFAULT_ENCODINGS, NO_DOCX, UNITS, Options

FORMATS = ("txt", "jsonl")


def preprocess(raw_dir: str | os.PathLike, out_file: str | os.PathLike, *, num_workers: int = 1,
               fmt: str = "txt", unit: str = "paragraph", dedup: bool = False, min_chars: int = 0,
               csv_column: str = "text", overwrite: bool = False,
               encodings: Sequence[str] = DEFAULT_ENCODINGS, quiet: bool = True,
               shard: tuple[int, int] = (0, 1), chunk_bytes: int = CHUNK_BYTES) -> PreprocessReport:
    """Preprocess every supported file under `raw_dir` (or shard ``i`` of ``n`` of them) into `out_file`.

    Raises `lora_ns.errors.UserError` (messages name the CLI flags) for bad arguments or when no
    file could be read; then nothing is written. `chunk_bytes` exists for tests.
    """
    raw_dir, out_file = Path(raw_dir), Path(out_file)
    if fmt not in FORMATS or unit not in UNITS:
        raise fail("--format/--unit", "", f"got {fmt!r}/{unit!r}", f"use one of {FORMATS} / {UNITS}")
    _check_paths(raw_dir, out_file, overwrite)
    opts = Options(fmt, unit, min_chars, csv_column, _check_encodings(encodings), chunk_bytes)
    files, ignored, unlisted = discover(raw_dir, exclude=[out_file])
    if not files:
        raise fail(f"--raw-dir {raw_dir}", "", f"no .txt/.csv/.docx/.zip files found "
                   f"({sum(ignored.values())} other files ignored)", "put the raw documents in this folder")
    files = split_by_size(files, [_size(p) for p in files], shard[1])[shard[0]]  # may be empty: empty output
    docx = next((p for p in files if p.suffix.lower() == ".docx"), None)
    if docx and importlib.util.find_spec("docx") is None:
        raise fail(str(docx), "", *NO_DOCX.split(" — "))
    report = PreprocessReport(out_file=str(out_file), files_ignored=sum(ignored.values()),
                              ignored_by_ext=dict(ignored), files_skipped=unlisted)
    started = time.perf_counter()
    with parents_removed_on_error(out_file.parent):
        tasks = list(plan_tasks(files, raw_dir, chunk_bytes))
        process(tasks, opts, out_file, num_workers, dedup, quiet, report, raw_dir, len(files))
    report.seconds = time.perf_counter() - started
    return report


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
            raise fail(f"--encodings {name}", "", "unknown encoding",
                       "use names like utf-8,gb18030,latin-1") from None
    if not encodings:
        raise fail("--encodings", "", "empty", "give at least one encoding, e.g. utf-8")
    return tuple(encodings)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def _default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=PROG, description="Clean a folder of .txt/.csv/.docx/.zip files into one text corpus "
        "for continued pretraining (one sample per line, or JSON lines).")
    parser.add_argument("--raw-dir", default="data/raw",
                        help="folder read recursively (default: %(default)s)")
    parser.add_argument("--out-file", default="data/processed/all_text.txt",
                        help="output file (default: %(default)s)")
    parser.add_argument("--num-workers", type=_count(1), default=_default_workers(),
                        help="worker processes; 1 runs in-process (default: min(4, CPUs) = %(default)s)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="txt",
                        help="txt: one sample per line; jsonl: {\"text\": ...} per line, line breaks kept")
    parser.add_argument("--unit", choices=UNITS, default="paragraph",
                        help="one sample per blank-line-separated paragraph, per document (a file or a CSV "
                        "row), or per line (default: %(default)s)")
    parser.add_argument("--csv-column", default="text",
                        help="CSV column holding the text (default: %(default)s)")
    parser.add_argument("--dedup", action="store_true", help="drop exact duplicate samples (keeps the first)")
    parser.add_argument("--min-chars", type=_count(0), default=0,
                        help="drop samples shorter than this many characters (default: %(default)s)")
    parser.add_argument("--encodings", default=",".join(DEFAULT_ENCODINGS),
                        help="encodings tried in order for text and CSV (default: %(default)s)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="only the I-th of N contiguous, equal-size parts of the files (0-based), "
                        "to spread one corpus over machines; concatenate the outputs in order")
    parser.add_argument("--overwrite", action="store_true", help="replace --out-file if it exists")
    parser.add_argument("--report-file", help="also write the report as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # a usage error is one UserError line (CommandParser); --help exits 0
        return run_cli(PROG, lambda: _run(make_parser().parse_args(argv)))
    except SystemExit as exc:
        return int(exc.code or 0)


def _run(args: argparse.Namespace) -> int:
    report = preprocess(
        args.raw_dir, args.out_file, num_workers=args.num_workers, fmt=args.fmt, unit=args.unit,
        dedup=args.dedup, min_chars=args.min_chars, csv_column=args.csv_column, overwrite=args.overwrite,
        encodings=[e.strip() for e in args.encodings.split(",") if e.strip()], quiet=args.quiet,
        shard=args.shard)
    if args.report_file:
        Path(args.report_file).write_text(json.dumps(report.to_json(), ensure_ascii=False, indent=2) + "\n",
                                          encoding="utf-8")
    print(report.summary())
    return 0
