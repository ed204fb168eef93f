"""Plan tasks, run them with `datasets`, write the output in order and keep the report.

``Dataset.from_generator(num_proc=N)`` is the worker pool: the task list is cut into N contiguous
shards of about equal bytes, each worker writes its rows to an Arrow file in a temp folder beside the
output, and those files are then read back in order as a stream (not memory-mapped) into the output.
So the output is byte-identical for any ``--num-workers`` and memory stays flat however large the
corpus is; the price is temporary disk space about the size of the output, and no output is written
until every worker is done. With one worker the same generator runs in-process, straight into the output.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

from lora_ns.errors import fail
from lora_ns.preprocess.readers import (KINDS, Options, Rows, SkipFile, find_cut, is_hidden, is_utf16,
                                        read_csv, read_docx, read_txt, read_zip, reason)

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


def discover(raw_dir: Path, exclude: Iterable[Path] = ()
             ) -> tuple[list[Path], Counter, list[tuple[str, str]]]:
    """Supported files under `raw_dir` sorted by relative path, a count of ignored ones by
    extension, and the folders that could not be listed (with the reason)."""
    skip = {p.resolve() for p in exclude}
    files: list[Path] = []
    ignored: Counter = Counter()
    unlisted: list[tuple[str, str]] = []

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
            elif path.resolve() not in skip:
                files.append(path)
    files.sort(key=lambda p: p.relative_to(raw_dir).as_posix())
    return files, +ignored, sorted(unlisted)


def plan_tasks(files: Iterable[Path], raw_dir: Path, chunk_bytes: int) -> Iterator[Task]:
    """Tasks in output order; a .txt file larger than `chunk_bytes` becomes several ranges (not a
    UTF-16 one: cutting at b"\\n" would split its characters, so it is streamed whole)."""
    for path in files:
        rel, kind = path.relative_to(raw_dir).as_posix(), KINDS[path.suffix.lower()]
        start, part = 0, 0
        try:
            size = path.stat().st_size
            if kind != "txt" or size <= chunk_bytes or is_utf16(str(path)):
                yield Task(str(path), rel, kind, 0, size)
                continue
            with open(path, "rb") as fh:
                while start < size:
                    end = size if start + chunk_bytes >= size else find_cut(fh, start + chunk_bytes, size)
                    yield Task(str(path), rel, kind, start, end, part, end >= size)
                    start, part = end, part + 1
        except OSError as err:
            yield Task(str(path), rel, kind, start, start, part, True, error=reason(err))


def split_by_size(items: list, sizes: list[int], count: int) -> list[list]:
    """`items` cut into `count` contiguous groups of about equal total size (some may be empty)."""
    groups: list[list] = [[] for _ in range(count)]
    total, done = sum(sizes) or 1, 0
    for item, size in zip(items, sizes):
        groups[min(count - 1, done * count // total)].append(item)
        done += size
    return groups


def generate(shards: list[list[Task]], opts: Options) -> Iterator[dict]:
    """The `datasets` generator (runs in a worker): every task's rows, each task closed by a
    ``task`` row. Never raises for a bad file: the failure goes into that row."""
    for shard in shards:
        for task in shard:
            rows, ignored = Rows(opts), []
            try:
                if task.error:
                    raise SkipFile(task.error)
                if task.kind == "txt":
                    enc = yield from read_txt(task.path, task.start, task.end, opts, rows)
                elif task.kind == "csv":
                    enc = yield from read_csv(partial(open, task.path, "rb"), opts, rows)
                elif task.kind == "docx":
                    with open(task.path, "rb") as raw:
                        enc = yield from read_docx(raw, opts, rows)
                else:
                    enc = yield from read_zip(task.path, task.rel, opts, rows, ignored)
                yield rows.end("task", enc=enc, ignored=ignored)
            except Exception as err:
                yield rows.end("task", error=reason(err))


def run_tasks(tasks: list[Task], opts: Options, num_workers: int, work_dir: str,
              quiet: bool) -> Iterator[dict]:
    """All rows in task order: generated by `num_workers` processes into Arrow files, then streamed.
    With one worker (or one task) they are generated here and streamed directly, with no temp files."""
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
    """Writes rows in order and keeps the report. A unit that failed is undone by truncating the
    output back to where it started (the output is a temp file until the end)."""

    def __init__(self, out: IO[bytes], report: PreprocessReport, dedup: bool, tasks: Iterator[Task],
                 progress: Callable[[int], object]):
        self.out, self.report, self.tasks, self.progress = out, report, tasks, progress
        self.seen: set[int] | None = set() if dedup else None
        self.added: list[int] = []  # dedup hashes added since the current task started
        self.failed: set[str] = set()
        self.encodings: dict[str, set[str]] = {}
        self.task_mark = self.unit_mark = self._mark()

    def _mark(self) -> tuple[int, int, int, int]:
        return self.out.tell(), self.report.samples_written, self.report.duplicates_dropped, len(self.added)

    def _undo(self, mark: tuple[int, int, int, int]) -> None:
        pos, self.report.samples_written, self.report.duplicates_dropped, kept = mark
        self.out.seek(pos)
        self.out.truncate()
        if self.seen is not None:
            self.seen.difference_update(self.added[kept:])
        del self.added[kept:]

    def write(self, blob: bytes) -> None:
        if self.seen is None:
            self.out.write(blob)
            self.report.samples_written += blob.count(b"\n")
            return
        records = blob.split(b"\n")[:-1]
        kept = []
        for record in records:  # an 8-byte digest per unique sample: ~70 bytes of RAM each, not the text
            digest = int.from_bytes(hashlib.blake2b(record, digest_size=8).digest(), "little")
            if digest not in self.seen:
                self.seen.add(digest)
                self.added.append(digest)
                kept.append(record)
        if kept:
            self.out.write(b"\n".join(kept) + b"\n")
        self.report.samples_written += len(kept)
        self.report.duplicates_dropped += len(records) - len(kept)

    def end(self, note: dict) -> None:
        """A unit ended: keep or undo what it wrote, and note what happened in the report."""
        report, error = self.report, note.get("error")
        task = next(self.tasks) if note["kind"] == "task" else None
        if note["kind"] == "retry" or (note["kind"] == "member" and error):
            self._undo(self.unit_mark)
            if error:
                report.files_skipped.append((note["rel"], error))
        elif note["kind"] == "member":
            report.short_dropped += note["short"]
            self._note_encoding(note["rel"], {note["enc"]})
        elif task.rel in self.failed or error:
            self._undo(self.task_mark)
            if task.rel not in self.failed:
                self._fail(task, error)
        else:
            report.short_dropped += note["short"]
            report.bytes_in += task.end - task.start
            report.files_ignored += len(note["ignored"])
            for ext in note["ignored"]:
                report.ignored_by_ext[ext] = report.ignored_by_ext.get(ext, 0) + 1
            self.encodings.setdefault(task.rel, set()).add(note["enc"])
        if task is not None:
            self.progress(task.end - task.start)
            if task.last:
                self._finish_file(task.rel)
            self.added.clear()
            self.task_mark = self._mark()
        self.unit_mark = self._mark()

    def _fail(self, task: Task, error: str) -> None:
        if task.part:
            error += f" (in bytes {task.start}-{task.end}; the {task.part} range(s) before it were kept)"
        self.report.files_skipped.append((task.rel, error))
        self.failed.add(task.rel)

    def _finish_file(self, rel: str) -> None:
        encodings = self.encodings.pop(rel, set())
        if rel in self.failed:
            self.failed.discard(rel)
        else:
            self._note_encoding(rel, encodings)
            self.report.files_read += 1

    def _note_encoding(self, rel: str, encodings: set[str | None]) -> None:
        others = sorted(e for e in encodings if e and codecs.lookup(e).name != "utf-8")
        if others:
            self.report.fallback_encodings.append((rel, "+".join(others)))


def process(tasks: list[Task], opts: Options, out_file: Path, num_workers: int, dedup: bool, quiet: bool,
            report: PreprocessReport, raw_dir: Path, n_files: int) -> None:
    """Run every task and write the output atomically; refuse to finish if no file was readable."""
    from tqdm import tqdm

    from lora_ns.fileio import atomic_output

    work_dir = tempfile.mkdtemp(prefix=f".{out_file.name}.work-", dir=out_file.parent)
    bar = tqdm(total=sum(t.end - t.start for t in tasks), unit="B", unit_scale=True, unit_divisor=1024,
               desc="preprocess", disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)
    try:
        with atomic_output(out_file, "wb") as out, bar:
            collector = Collector(out, report, dedup, iter(tasks), bar.update)
            for row in run_tasks(tasks, opts, num_workers, work_dir, quiet):
                if row["note"] is None:
                    collector.write(row["data"])
                else:
                    collector.end(json.loads(row["note"]))
            if tasks and report.files_read == 0:
                path, why = report.files_skipped[0] if report.files_skipped else ("", "")
                raise fail(f"--raw-dir {raw_dir}", "", f"no readable files: all {n_files} "
                           f"were skipped (first: {path}: {why})", "fix or remove the broken files")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


@contextlib.contextmanager
def parents_removed_on_error(folder: Path) -> Iterator[None]:
    """mkdir -p `folder`; if the block fails, remove the folders it created (no empty output dir left)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for created in missing:
            with contextlib.suppress(OSError):
                created.rmdir()
        raise
