"""Find the files, cut them into tasks, run the tasks with `datasets`, write the output in order.

``Dataset.from_generator(num_proc=N)`` is the worker pool: the task list is cut into N contiguous
shards of about equal bytes, each worker writes its rows to an Arrow file in a temp folder beside the
output, and those files are read back in order as a stream (not memory-mapped) into the output. So the
output is byte-identical for any ``--num-workers`` and memory stays flat however large the corpus is;
the price is temp disk space about the size of the output. With one worker the same generator runs
in-process, straight into the output.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import secrets
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

from lora_ns.errors import fail
from lora_ns.fileio import atomic_output
from lora_ns.preprocess.readers import KINDS, Options, find_cut, generate, is_hidden, is_utf16, reason

PROG = "lora_ns.preprocess"


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
        return {**asdict(self), "files_skipped": [{"path": p, "reason": r} for p, r in self.files_skipped],
                "fallback_encodings": [{"path": p, "encoding": e} for p, e in self.fallback_encodings],
                "mb_per_s": round(self.mb_per_s, 2)}

    def summary(self, max_listed: int = 20) -> str:
        ignored = ", ".join(f"{ext} x{n}" for ext, n in sorted(self.ignored_by_ext.items()))
        lines = [f"{PROG}: {self.files_read} files read, {len(self.files_skipped)} skipped, "
                 f"{self.files_ignored} ignored{f' ({ignored})' if ignored else ''} -> {self.out_file}",
                 f"  samples written: {self.samples_written:,} (duplicates dropped: "
                 f"{self.duplicates_dropped:,}, too short: {self.short_dropped:,})",
                 f"  read {self.bytes_in / 1e6:,.1f} MB in {self.seconds:.1f} s ({self.mb_per_s:,.1f} MB/s)"]
        for title, rows in (("decoded with a fallback encoding", self.fallback_encodings),
                            ("skipped", self.files_skipped)):
            lines += [f"  {title}:"] * bool(rows) + [f"    {p}: {what}" for p, what in rows[:max_listed]]
            if len(rows) > max_listed:
                lines.append(f"    ... and {len(rows) - max_listed} more (see --report-file)")
        return "\n".join(lines)


class Task(NamedTuple):
    """One unit of work: a whole file, or the byte range [start, end) of a large .txt file."""

    path: str
    rel: str
    start: int
    end: int
    part: int = 0
    last: bool = True


def discover(raw_dir: Path, report: PreprocessReport, exclude: Path) -> list[tuple[Path, int]]:
    """Supported files under `raw_dir` and their sizes, sorted by relative path; the others are counted
    in the report as ignored (by extension), and folders that cannot be listed as skipped."""
    files, ignored, unlisted = [], Counter(), []

    def on_error(err: OSError) -> None:
        where = Path(err.filename).relative_to(raw_dir).as_posix() if err.filename else str(raw_dir)
        unlisted.append((where + "/", reason(err)))

    for root, dirs, names in os.walk(raw_dir, onerror=on_error):
        ignored["(hidden)"] += sum(map(is_hidden, dirs))
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        for name in names:
            path, ext = Path(root, name), Path(name).suffix.lower()
            if is_hidden(name) or ext not in KINDS:
                ignored["(hidden)" if is_hidden(name) else ext or "(none)"] += 1
            elif path.resolve() != exclude.resolve():
                files.append((path, _size(path)))
    report.files_ignored, report.ignored_by_ext = sum(ignored.values()), dict(+ignored)
    report.files_skipped = sorted(unlisted)
    return sorted(files, key=lambda item: item[0].relative_to(raw_dir).as_posix())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def plan_tasks(files: list[tuple[Path, int]], raw_dir: Path, chunk_bytes: int, unit: str) -> Iterator[Task]:
    """Tasks in output order; a .txt file larger than `chunk_bytes` becomes several ranges (not with
    ``--unit file``, where a file is one sample, nor a UTF-16 one: it is streamed whole). A file that
    vanished is one task, which fails with the reason."""
    for path, size in files:
        cuts = [0]
        try:
            if unit != "file" and path.suffix.lower() == ".txt" and size > chunk_bytes and not is_utf16(path):
                with open(path, "rb") as fh:
                    while cuts[-1] + chunk_bytes < size:
                        cuts.append(find_cut(fh, cuts[-1] + chunk_bytes, size))
        except OSError:
            cuts = [0]
        cuts += [size] * (cuts[-1] < size or len(cuts) == 1)
        for part, (start, end) in enumerate(zip(cuts, cuts[1:])):
            yield Task(str(path), path.relative_to(raw_dir).as_posix(), start, end, part, end == cuts[-1])


def split_by_size(items: list, sizes: list[int], count: int) -> list[list]:
    """`items` cut into `count` contiguous groups of about equal total size (some may be empty)."""
    groups: list[list] = [[] for _ in range(count)]
    total, done = sum(sizes) or 1, 0
    for item, size in zip(items, sizes):
        groups[min(count - 1, done * count // total)].append(item)
        done += size
    return groups


def run_tasks(tasks: list[Task], opts: Options, num_workers: int, work_dir: str,
              quiet: bool) -> Iterator[dict]:
    """All rows in task order: generated by `num_workers` processes into Arrow files, then streamed.
    With one worker (or one task) they are generated here, with no temp files."""
    shards = [s for s in split_by_size(tasks, [t.end - t.start for t in tasks], num_workers) if s]
    if len(shards) <= 1:
        yield from generate(shards, opts)
        return
    import datasets
    import pyarrow as pa

    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity_error()
    if quiet or not sys.stderr.isatty():
        datasets.disable_progress_bars()
    try:
        features = datasets.Features({"data": datasets.Value("binary"), "note": datasets.Value("string")})
        dataset = datasets.Dataset.from_generator(
            generate, features=features, cache_dir=work_dir, gen_kwargs={"shards": shards, "opts": opts},
            num_proc=len(shards), fingerprint=secrets.token_hex(8),
            writer_batch_size=8)  # rows are blobs of up to ~4 MiB of text: a batch stays ~32 MB
    except RuntimeError as err:  # datasets' message when a worker is killed (OOM, segfault)
        if "abruptly died" not in str(err):
            raise
        raise fail("--num-workers", "", "a worker process died (killed for memory?)",
                   "rerun with fewer workers, or with --num-workers 1 to find the file") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars() if bars else datasets.disable_progress_bars()
    for cache in dataset.cache_files:
        with pa.OSFile(cache["filename"]) as source:
            for batch in pa.ipc.open_stream(source):
                yield from batch.to_pylist()


class Collector:
    """Writes rows in order and keeps the report. The rows since the last note are one unit: a unit that
    failed, or belongs to a file that failed earlier, is taken back by truncating the output."""

    def __init__(self, out: IO[bytes], report: PreprocessReport, dedup: bool, tasks: Iterator[Task]):
        self.out, self.report, self.tasks = out, report, tasks
        self.dedup, self.seen = dedup, set()
        self.added: list[int] = []  # dedup hashes added by the current unit
        self.failed = ""  # the file whose earlier range failed: its later ranges are dropped too
        self.encodings: set[str | None] = set()  # of the current file's ranges so far
        self.mark = self._mark()

    def _mark(self) -> tuple[int, int, int]:
        return self.out.tell(), self.report.samples_written, self.report.duplicates_dropped

    def write(self, blob: bytes) -> None:
        if self.dedup:  # an 8-byte digest per unique sample: ~70 bytes of RAM each, not the text
            records, kept = blob.split(b"\n")[:-1], []
            for record in records:
                digest = int.from_bytes(hashlib.blake2b(record, digest_size=8).digest(), "little")
                if digest not in self.seen:
                    self.seen.add(digest)
                    self.added.append(digest)
                    kept.append(record + b"\n")
            self.report.duplicates_dropped += len(records) - len(kept)
            blob = b"".join(kept)
        self.out.write(blob)
        self.report.samples_written += blob.count(b"\n")

    def end(self, note: dict) -> int:
        """A unit ended: keep or take back what it wrote since the last note, and update the report.
        Returns the bytes of input it finished (for the progress bar)."""
        report, error, kind = self.report, note.get("error"), note["kind"]
        task = next(self.tasks) if kind == "task" else None
        if kind == "retry" or error or (task and task.rel == self.failed):
            pos, report.samples_written, report.duplicates_dropped = self.mark
            self.out.seek(pos)
            self.out.truncate()
            self.seen.difference_update(self.added)
            if error and task and task.rel != self.failed:
                self.failed = task.rel
                where = f" (in bytes {task.start}-{task.end}; the {task.part} range(s) before it were kept)"
                report.files_skipped.append((task.rel, error + where * bool(task.part)))
            elif error and not task:
                report.files_skipped.append((note["rel"], error))
        elif kind == "member":
            report.short_dropped += note["short"]
            self._note_encodings(note["rel"], {note["enc"]})
        else:
            report.short_dropped += note["short"]
            report.bytes_in += task.end - task.start
            report.files_ignored += len(note["ignored"])
            for ext in note["ignored"]:
                report.ignored_by_ext[ext] = report.ignored_by_ext.get(ext, 0) + 1
            self.encodings.add(note["enc"])
        if task and task.last:
            if task.rel != self.failed:
                report.files_read += 1
                self._note_encodings(task.rel, self.encodings)
            self.encodings = set()
        self.added.clear()
        self.mark = self._mark()
        return task.end - task.start if task else 0

    def _note_encodings(self, rel: str, encodings: set[str | None]) -> None:
        if others := sorted(e for e in encodings if e and codecs.lookup(e).name != "utf-8"):
            self.report.fallback_encodings.append((rel, "+".join(others)))


def process(tasks: list[Task], opts: Options, out_file: Path, num_workers: int, dedup: bool, quiet: bool,
            report: PreprocessReport, raw_dir: Path, whole: bool = True) -> None:
    """Run every task and write the output atomically; refuse to finish if no file was readable or, for the
    `whole` corpus (not one shard), nothing is left to write."""
    from tqdm import tqdm

    with (tempfile.TemporaryDirectory(prefix=f".{out_file.name}.work-", dir=out_file.parent) as work_dir,
          atomic_output(out_file, "wb") as out,
          tqdm(total=sum(t.end - t.start for t in tasks), unit="B", unit_scale=True, unit_divisor=1024,
               desc="preprocess", disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True) as bar):
        collector = Collector(out, report, dedup, iter(tasks))
        for row in run_tasks(tasks, opts, num_workers, work_dir, quiet):
            if row["note"] is None:
                collector.write(row["data"])
            else:
                bar.update(collector.end(json.loads(row["note"])))
        if tasks and report.files_read == 0:
            path, why = report.files_skipped[0] if report.files_skipped else ("", "")
            raise fail(f"--raw-dir {raw_dir}", "", f"no readable files: all {len({t.rel for t in tasks})} "
                       f"were skipped (first: {path}: {why})", "fix or remove the broken files")
        if tasks and report.samples_written == 0 and whole:  # one shard of many may hold only empty files
            short = report.short_dropped
            raise fail(f"--raw-dir {raw_dir}", "", "no samples to write: " + (
                f"all {short:,} are shorter than --min-chars {opts.min_chars}" if short else
                f"the {report.files_read} files read hold no text"), "lower --min-chars" if short else
                "add text to the files (for CSV: check --csv-column)")
