"""``python -m lora_ns.preprocess``: arguments, checks, and `preprocess()`, the function it runs."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lora_ns.command_line import CommandParser, at_least, at_least_one
from lora_ns.errors import fail, program, run_cli
from lora_ns.fileio import guard_output_file, write_json_atomic
from lora_ns.preprocess.pipeline import PROG, PreprocessReport, discover, plan_tasks, process, split_by_size
from lora_ns.preprocess.readers import CHUNK_BYTES, DEFAULT_ENCODINGS, NO_DOCX, UNITS, Options

FORMATS = ("txt", "jsonl")
BYTES_PER_WORKER = 128 << 20  # a second worker pays off only past the fixed cost of datasets' pool (~2-10 s)


def preprocess(raw_dir: str | os.PathLike, out_file: str | os.PathLike, *, num_workers: int | None = None,
               fmt: str = "txt", unit: str = "paragraph", dedup: bool = False, min_chars: int = 0,
               csv_column: str = "text", overwrite: bool = False,
               encodings: Sequence[str] = DEFAULT_ENCODINGS, quiet: bool = True,
               shard: tuple[int, int] = (0, 1), chunk_bytes: int = CHUNK_BYTES) -> PreprocessReport:
    """Preprocess every supported file under `raw_dir` (or shard ``i`` of ``n`` of them) into `out_file`.

    Raises `lora_ns.errors.UserError` (messages name the CLI flags) for bad arguments or when no file
    could be read; then nothing is written. `num_workers=None`: one per 128 MB of input, at most
    min(4, CPUs). `chunk_bytes` exists for tests.
    """
    raw_dir, out_file = Path(raw_dir), Path(out_file)
    if fmt not in FORMATS or unit not in UNITS:
        raise fail("--format/--unit", "", f"got {fmt!r}/{unit!r}", f"use one of {FORMATS} / {UNITS}")
    _check_paths(raw_dir, out_file, overwrite)
    for name in encodings:
        try:
            codecs.lookup(name)
        except LookupError:
            raise fail(f"--encodings {name}", "", "unknown encoding",
                       "use names like utf-8,gb18030,latin-1") from None
    if not encodings:
        raise fail("--encodings", "", "empty", "give at least one encoding, e.g. utf-8")
    report, started = PreprocessReport(out_file=str(out_file)), time.perf_counter()
    files = discover(raw_dir, report, exclude=out_file)
    if not files:
        raise fail(f"--raw-dir {raw_dir}", "", f"no .txt/.csv/.docx/.zip files found ({report.files_ignored} "
                   "other files ignored)", "put the raw documents in this folder")
    files = split_by_size(files, [size for _, size in files], shard[1])[shard[0]]  # may be empty
    docx = next((path for path, _ in files if path.suffix.lower() == ".docx"), None)
    if docx and importlib.util.find_spec("docx") is None:
        raise fail(str(docx), "", *NO_DOCX.split(" — "))
    tasks = list(plan_tasks(files, raw_dir, chunk_bytes, unit))
    if num_workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        num_workers = max(1, min(4, cpus, sum(size for _, size in files) // BYTES_PER_WORKER))
    opts = Options(fmt, unit, min_chars, csv_column, tuple(encodings), chunk_bytes)
    created = [p for p in (out_file.parent, *out_file.parent.parents) if not p.exists()]
    try:  # if it fails, remove the folders it created (no empty output dir left behind)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        process(tasks, opts, out_file, num_workers, dedup, quiet, report, raw_dir, shard[1] == 1)
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    report.seconds = time.perf_counter() - started
    return report


def _check_paths(raw_dir: Path, out_file: Path, overwrite: bool) -> None:
    if not raw_dir.exists():
        raise fail(f"--raw-dir {raw_dir}", "", "directory not found", "pass an existing folder")
    if not raw_dir.is_dir():
        raise fail(f"--raw-dir {raw_dir}", "", "not a directory", "pass the folder that holds the raw files")
    guard_output_file(out_file, overwrite, "--out-file")
    if out_file.resolve().is_relative_to(raw_dir.resolve()):  # this run leaves it out; the next would not
        print(f"{program(PROG)}: warning: {out_file}: --out-file: inside --raw-dir, where the next run reads "
              "it as raw input (its text twice in that corpus) — write it outside --raw-dir", file=sys.stderr)


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=PROG, description="Clean a folder of .txt/.csv/.docx/.zip files into one "
                           "text corpus for continued pretraining (one sample per line, or JSON lines).",
                           paths=("raw_dir", "out_file", "report_file"))
    add = parser.add_argument
    add("--raw-dir", default="data/raw", help="folder read recursively (default: %(default)s)")
    add("--out-file", default="data/processed/all_text.txt", help="output file (default: %(default)s)")
    add("--num-workers", type=at_least_one, help="worker processes; 1 runs in-process (default: one per "
        "128 MB of input, at most min(4, CPUs))")
    add("--format", dest="fmt", choices=FORMATS, default="txt",
        help="txt: one sample per line; jsonl: {\"text\": ...} per line, line breaks kept")
    add("--unit", choices=UNITS, default="paragraph", help="one sample per blank-line-separated paragraph, "
        "per document (a file or a CSV row), or per line (default: %(default)s)")
    add("--csv-column", default="text", help="CSV column holding the text (default: %(default)s)")
    add("--dedup", action="store_true", help="drop exact duplicate samples (keeps the first)")
    add("--min-chars", type=at_least(0), default=0,
        help="drop samples shorter than this many characters (default: %(default)s)")
    add("--encodings", default=",".join(DEFAULT_ENCODINGS), type=lambda text: [
        e.strip() for e in text.split(",") if e.strip()], help="encodings tried in order for text and CSV "
        "(default: %(default)s)")
    add("--shard", type=_shard, default=(0, 1), metavar="I/N", help="only the I-th of N contiguous, "
        "equal-size parts of the files (0-based), to spread one corpus over machines; concatenate the "
        "outputs in order")
    add("--overwrite", action="store_true", help="replace --out-file (and --report-file) if they exist")
    add("--report-file", help="also write the report as JSON here")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # a usage error is one UserError line (CommandParser); --help exits 0
        return run_cli(PROG, lambda: _run(make_parser().parse_args(argv)))
    except SystemExit as exc:
        return int(exc.code or 0)


def _run(args: argparse.Namespace) -> int:
    report_file = vars(args).pop("report_file")  # every other flag is a parameter of preprocess()
    if report_file:  # before the corpus is read: a folder here stopped the run after the output was written
        guard_output_file(report_file, args.overwrite, "--report-file")
    report = preprocess(**vars(args))
    if report_file:
        write_json_atomic(report_file, report.to_json())
    print(report.summary())
    return 0
