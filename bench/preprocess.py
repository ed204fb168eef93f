"""Benchmark lora_ns.preprocess: throughput with 1 and 2 workers, and peak RSS on a small vs a 10x corpus.

    python bench/preprocess.py            # 100 MB vs 1 GB corpus
    python bench/preprocess.py --small    # 10 MB vs 100 MB (quick)
    python bench/preprocess.py --small --baseline /path/to/other/checkout   # before/after, same run

Not a test. Each corpus is generated into a temp folder (a mix of ~1 MiB .txt files plus a few large
ones that get split into ranges, English and Chinese paragraphs). Every measurement runs in a fresh
subprocess, which reports its own peak RSS (the parent, which writes the output) and that of its
children (the largest worker), so runs do not see each other's peaks. Streaming is working when the
peaks stay flat while the corpus grows 10x. Workers are `datasets`' pool (``from_generator(num_proc=N)``);
their Arrow files go to a temp folder beside the output, so allow ~3x the corpus in free space.
With ``--baseline`` each measurement is also taken with that checkout's lora_ns, right after ours.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000
BLOCK = 1 << 20

_MEASURE = r"""
import json, resource, sys, time
from lora_ns.preprocess import main
argv = json.loads(sys.argv[1])
started = time.perf_counter()
code = main(argv)
seconds = time.perf_counter() - started
print(json.dumps({"rc": code, "seconds": seconds, "module": sys.modules["lora_ns.preprocess"].__file__,
                  "parent_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

_EN = ("The quick brown fox {i} jumps over the lazy dog while the committee reviews chapter {j} of the "
       "annual report,\nwhich was wrapped at a fixed width by an old editor and carries on for a while.")
_ZH = "第{i}章：继续预训练需要大量干净的中文文本，\n这段文字在固定宽度处换行，并且包含编号{j}以避免完全重复。"


def _paragraphs(n: int) -> list[str]:
    out = []
    for i in range(n):
        template = _ZH if i % 3 == 0 else _EN
        out.append(template.format(i=i, j=i * 7 % 101) + ("  extra\tspaces" if i % 5 == 0 else ""))
    return out


def _block_source() -> tuple[bytes, list[int]]:
    """~2 MiB of paragraphs and the byte offsets where each paragraph starts."""
    paras = [(p + "\n\n").encode("utf-8") for p in _paragraphs(20000)]
    offsets, pos = [], 0
    for p in paras:
        offsets.append(pos)
        pos += len(p)
        if pos > 2 * BLOCK:
            break
    return b"".join(paras)[:pos], offsets


def _write_file(path: Path, size: int, source: bytes, offsets: list[int], seq: int) -> int:
    """Write ~`size` bytes as 1 MiB blocks, each a different rotation of the source with a unique
    header paragraph, so the data is varied (and not deduplicable) but cheap to produce."""
    written = 0
    with open(path, "wb", buffering=0) as fh:
        while written < size:
            start = offsets[(seq * 7919) % len(offsets)]
            header = f"document {path.name} block {seq}\n\n".encode()
            chunk = header + source[start:start + min(BLOCK, size - written)]
            cut = chunk.rfind(b"\n\n") + 2  # end on a paragraph boundary
            if cut < 2:
                break
            fh.write(chunk[:cut])
            written += cut
            seq += 1
    return seq


def generate(folder: Path, total: int) -> int:
    """A corpus of ~`total` bytes: a quarter in big files (<= 256 MB each, half for small corpora, so
    there is always one big enough to be split into ranges), the rest in ~1 MiB files."""
    folder.mkdir(parents=True, exist_ok=True)
    source, offsets = _block_source()
    big_total = total // 2 if total <= 20 * MB else total // 4
    n_big = max(1, -(-big_total // (256 * MB)))
    seq = 0
    for k in range(n_big):
        seq = _write_file(folder / f"big_{k}.txt", big_total // n_big, source, offsets, seq)
    for k in range((total - big_total) // BLOCK):
        sub = folder / f"part_{k // 100:03d}"
        sub.mkdir(exist_ok=True)
        seq = _write_file(sub / f"doc_{k:05d}.txt", BLOCK - 4096, source, offsets, seq)
    return sum(p.stat().st_size for p in folder.rglob("*.txt"))


def measure(raw: Path, out: Path, workers: int, extra: list[str], repo: Path = REPO) -> dict:
    """One preprocess run of `repo`'s lora_ns in a fresh interpreter; its timing and peak RSS figures."""
    argv = ["--raw-dir", str(raw), "--out-file", str(out), "--num-workers", str(workers), "--quiet",
            "--overwrite", "--report-file", str(out) + ".report.json", *extra]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(argv)], cwd=repo, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench: preprocess failed:\n{proc.stderr}")
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert Path(stats["module"]).is_relative_to(repo / "lora_ns"), stats["module"]  # the code we meant
    return {"code": "baseline" if repo != REPO else "this", "workers": workers,
            "bytes_in": report["bytes_in"], "samples": report["samples_written"],
            "seconds": round(stats["seconds"], 2),
            "mb_per_s": round(report["bytes_in"] / MB / stats["seconds"], 1),
            "parent_rss_mb": round(stats["parent_kb"] / 1024, 1),
            "worker_rss_mb": round(stats["workers_kb"] / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="10 MB vs 100 MB instead of 100 MB vs 1 GB")
    parser.add_argument("--workers", default="1,2", help="worker counts to time (default: %(default)s)")
    parser.add_argument("--dedup", action="store_true",
                        help="also pass --dedup (its hash set grows with the corpus)")
    parser.add_argument("--tmp-dir", help="where to generate the corpora (default: system temp)")
    parser.add_argument("--baseline", type=Path, help="another checkout (its root) to measure the same way")
    args = parser.parse_args(argv)
    sizes = [10 * MB, 100 * MB] if args.small else [100 * MB, 1000 * MB]
    workers = [int(w) for w in args.workers.split(",")]
    extra = ["--dedup"] if args.dedup else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-", dir=args.tmp_dir) as tmp:
        for size in sizes:
            raw = Path(tmp, f"raw_{size // MB}mb")
            if shutil.disk_usage(tmp).free < 3 * size:
                raise SystemExit(f"bench: need ~{3 * size // MB} MB free in {tmp} (pass --tmp-dir)")
            started = time.perf_counter()
            actual = generate(raw, size)
            gen_s = time.perf_counter() - started
            print(f"generated {actual / MB:,.0f} MB in {gen_s:.1f} s", file=sys.stderr)
            for n in workers:
                for repo in [REPO] + ([args.baseline.resolve()] if args.baseline else []):
                    rows.append({"target_mb": size // MB, "corpus_mb": round(actual / MB, 1),
                                 **measure(raw, Path(tmp, "out.txt"), n, extra, repo)})
            shutil.rmtree(raw)
    print(f"{'code':>8} {'corpus MB':>9} {'workers':>7} {'seconds':>8} {'MB/s':>7} {'samples':>10} "
          f"{'parent RSS MB':>13} {'worker RSS MB':>13}")
    for r in rows:
        workers_rss = r["worker_rss_mb"] if r["workers"] > 1 else "-"  # 1 worker runs in-process
        print(f"{r['code']:>8} {r['corpus_mb']:>9} {r['workers']:>7} {r['seconds']:>8} {r['mb_per_s']:>7} "
              f"{r['samples']:>10} {r['parent_rss_mb']:>13} {workers_rss:>13}")
    peak = {size // MB: max(max(r["parent_rss_mb"], r["worker_rss_mb"]) for r in rows
                            if r["target_mb"] == size // MB and r["code"] == "this") for size in sizes}
    small, large = (peak[size // MB] for size in sizes)
    growth = round(large / small, 2) if small else None
    print(f"peak RSS (largest process, this code): {small} MB at {sizes[0] // MB} MB -> {large} MB at "
          f"{sizes[1] // MB} MB (x{growth} for x{sizes[1] // sizes[0]} data)")
    print(json.dumps({"bench": "preprocess", "sizes_mb": [size // MB for size in sizes], "results": rows,
                      "peak_rss_mb": peak, "peak_rss_growth": growth, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
