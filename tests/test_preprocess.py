"""Tests for lora_ns.preprocess on small generated corpora (no network, no GPU)."""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import docx
import pytest

from lora_ns import preprocess as pp
from lora_ns.preprocess import readers
from lora_ns.preprocess import main, preprocess

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def make_docx(path: Path, paragraphs: list[str]) -> Path:
    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    document.save(path)
    return path


def make_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return write(path, buf.getvalue())


def run(raw: Path, out: Path, **kwargs) -> tuple[pp.PreprocessReport, list[str]]:
    report = preprocess(raw, out, **kwargs)
    return report, out.read_text(encoding="utf-8").splitlines()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A mixed folder: txt (English, Chinese, BOM), csv, docx, zip, and two corrupt files."""
    raw = tmp_path / "raw"
    write(raw / "a_en.txt", "Hello   world,\tthis is\n  a wrapped paragraph.  \n\n\nSecond paragraph.\n")
    write(raw / "b_zh.txt", "第一段中文，\n没有空格。\n\n第二段 English 混排\n中文\n")
    write(raw / "c_bom.txt", b"\xef\xbb\xbfBOM first line\r\nsame paragraph\r\n")
    make_csv(raw / "d.csv", ["id", "text"], [["1", "csv row one"], ["2", "第二行"], ["3", ""]])
    make_docx(raw / "e.docx", ["Docx paragraph one.", "", "Docx 段落二。"])
    with zipfile.ZipFile(write(raw / "f.zip", b""), "w") as zf:
        zf.writestr("inner/z1.txt", "zip text one\n\nzip text two\n")
        zf.writestr("inner/z2.csv", "text\nzip csv row\n")
        zf.writestr("inner/image.png", b"\x89PNG")
    write(raw / "g_bad.docx", os.urandom(2048))
    write(raw / "h_bad.zip", os.urandom(2048))
    write(raw / "notes.pdf", b"%PDF-1.4")
    return raw


EXPECTED = [
    "Hello world, this is a wrapped paragraph.",
    "Second paragraph.",
    "第一段中文，没有空格。",
    "第二段 English 混排中文",
    "BOM first line same paragraph",
    "csv row one",
    "第二行",
    "Docx paragraph one.",
    "Docx 段落二。",
    "zip text one",
    "zip text two",
    "zip csv row",
]


def test_mixed_corpus_txt_output(corpus: Path, tmp_path: Path) -> None:
    report, lines = run(corpus, tmp_path / "out" / "all.txt")
    assert lines == EXPECTED
    assert report.files_read == 6
    assert report.samples_written == len(EXPECTED)
    assert report.files_ignored == 2  # notes.pdf and f.zip::inner/image.png
    assert report.ignored_by_ext == {".pdf": 1, ".png": 1}
    assert report.bytes_in > 0 and report.fallback_encodings == []
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # no temp/spill left over


def test_corrupt_files_are_skipped_with_reasons(corpus: Path, tmp_path: Path, capsys) -> None:
    report_file = tmp_path / "report.json"
    code = main(["--raw-dir", str(corpus), "--out-file", str(tmp_path / "all.txt"), "--quiet",
                 "--report-file", str(report_file)])
    assert code == 0
    skipped = {item["path"]: item["reason"] for item in json.loads(report_file.read_text())["files_skipped"]}
    assert set(skipped) == {"g_bad.docx", "h_bad.zip"}
    assert "not a .docx" in skipped["g_bad.docx"]
    assert "corrupt zip" in skipped["h_bad.zip"]
    out = capsys.readouterr().out
    assert "2 skipped" in out and "g_bad.docx: corrupt" in out


def test_a_report_file_that_cannot_be_written_stops_before_the_corpus_is_read(corpus, tmp_path, capsys):
    """--report-file naming a folder crashed with a traceback after the output had been written."""
    args = ["--raw-dir", str(corpus), "--out-file", str(tmp_path / "all.txt"), "--quiet", "--report-file"]
    assert main([*args, str(tmp_path)]) == 2
    assert "--report-file: is a folder" in capsys.readouterr().err and not (tmp_path / "all.txt").exists()
    (tmp_path / "report.json").write_text("{}")  # an earlier report is kept unless --overwrite
    assert main([*args, str(tmp_path / "report.json")]) == 2 and (tmp_path / "report.json").read_text() == "{}"
    assert main([*args, str(tmp_path / "report.json"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["files_read"] == 6


def test_bad_archive_member_and_csv_without_column(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write(raw / "good.txt", "kept\n")
    make_csv(raw / "nocol.csv", ["id", "body"], [["1", "x"]])
    with zipfile.ZipFile(write(raw / "mixed.zip", b""), "w") as zf:
        zf.writestr("bad.docx", os.urandom(512))
        zf.writestr("ok.txt", "member ok\n")
    report, lines = run(raw, tmp_path / "all.txt")
    assert lines == ["kept", "member ok"]
    reasons = dict(report.files_skipped)
    assert "no column 'text'" in reasons["nocol.csv"] and "'body'" in reasons["nocol.csv"]
    assert "not a .docx" in reasons["mixed.zip::bad.docx"]
    assert report.files_read == 2


def test_csv_column_option(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_csv(raw / "d.csv", ["id", "body"], [["1", "from body\n\nsecond para"]])
    _, lines = run(raw, tmp_path / "all.txt", csv_column="body")
    assert lines == ["from body", "second para"]


def test_encoding_fallbacks_are_reported(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write(raw / "gbk.txt", "简体中文内容\n".encode("gb18030"))
    write(raw / "latin.txt", "café\n".encode("latin-1") + b"\xff\n")
    report, lines = run(raw, tmp_path / "all.txt")
    assert lines == ["简体中文内容", "café ÿ"]
    assert dict(report.fallback_encodings) == {"gbk.txt": "gb18030", "latin.txt": "latin-1"}
    report, lines = run(raw, tmp_path / "strict.txt", encodings=["utf-8", "gb18030"])
    assert dict(report.files_skipped) == {"latin.txt": "not valid text in utf-8, gb18030 — re-save it as "
                                          "UTF-8"}


def test_utf16_binary_and_archive_members(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write(raw / "a_utf16.txt", "UTF-16 文本\r\n\r\nsecond".encode("utf-16"))
    write(raw / "b_binary.txt", b"\x7fELF\x00\x00\x01" * 50)
    with zipfile.ZipFile(write(raw / "c.zip", b""), "w") as zf:
        zf.writestr("gbk.txt", "压缩包里的中文\n".encode("gb18030"))
        zf.writestr("__MACOSX/._gbk.txt", b"\x00\x05\x16\x07")
        zf.writestr("nested.zip", b"PK")
    report, lines = run(raw, tmp_path / "all.txt")
    assert lines == ["UTF-16 文本", "second", "压缩包里的中文"]
    assert dict(report.fallback_encodings) == {"a_utf16.txt": "utf-16", "c.zip::gbk.txt": "gb18030"}
    assert dict(report.files_skipped) == {"b_binary.txt": readers.BINARY}
    assert report.ignored_by_ext == {"(hidden)": 1, ".zip": 1}


def test_csv_rows_with_unit_file(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_csv(raw / "d.csv", ["text"], [["para one\n\npara two"], ["中文\n换行"]])
    _, lines = run(raw, tmp_path / "all.txt", unit="file")
    assert lines == ["para one para two", "中文换行"]


def test_units_and_cjk_joining(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write(raw / "t.txt", "中文\n文本\n\nhello\nworld\n\n中文\nEnglish\n")
    _, by_line = run(raw, tmp_path / "line.txt", unit="line")
    _, by_file = run(raw, tmp_path / "file.txt", unit="file")
    _, by_para = run(raw, tmp_path / "para.txt")
    assert by_line == ["中文", "文本", "hello", "world", "中文", "English"]
    assert by_para == ["中文文本", "hello world", "中文 English"]
    assert by_file == ["中文文本 hello world 中文 English"]


@pytest.mark.parametrize("chunk_bytes", [readers.CHUNK_BYTES, 16])
def test_each_unit_is_the_same_for_plain_utf16_and_zip_member(tmp_path: Path, chunk_bytes: int) -> None:
    """A .txt read as a byte range, a UTF-16 one and a zip member (both streamed in blocks) give the same
    samples; with --unit file one per file even past a 16-byte range/block (a 4 MiB one in real runs)."""
    one, two = "p1 a\np1 b\n\np2\n\n\np3 a\n中文\n文本\n\np4\n", "q1\n\nq2\n"
    raw = tmp_path / "raw"
    write(raw / "a.txt", one)
    write(raw / "b.txt", two)
    write(raw / "c.txt", one.encode("utf-16"))
    write(raw / "d.txt", two.encode("utf-16"))
    with zipfile.ZipFile(write(raw / "e.zip", b""), "w") as zf:
        zf.writestr("e1.txt", one)
        zf.writestr("e2.txt", two)
    expected = {"file": ["p1 a p1 b p2 p3 a 中文文本 p4", "q1 q2"],
                "paragraph": ["p1 a p1 b", "p2", "p3 a 中文文本", "p4", "q1", "q2"],
                "line": ["p1 a", "p1 b", "p2", "p3 a", "中文", "文本", "p4", "q1", "q2"]}
    for unit, samples in expected.items():
        report, lines = run(raw, tmp_path / f"{unit}.txt", unit=unit, chunk_bytes=chunk_bytes)
        assert lines == samples * 3, unit
        assert report.files_read == 5 and report.samples_written == 3 * len(samples)


def _reference(text: str, unit: str, keep_newlines: bool) -> list[str]:
    """Line-by-line statement of the normalization rules, to check the block-level implementation."""
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    if unit == "line":
        return [line for line in lines if line]
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if line:
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    paragraphs = [p for p in paragraphs if p]

    def join(parts: list[str]) -> str:  # no space between two CJK characters
        out = parts[0]
        for part in parts[1:]:
            out += part if ord(out[-1]) > 0x3000 and ord(part[0]) > 0x3000 else " " + part
        return out

    texts = ["\n".join(p) if keep_newlines else join(p) for p in paragraphs]
    if unit == "paragraph":
        return texts
    if not texts:
        return []
    return ["\n\n".join(texts)] if keep_newlines else [join(texts)]


def _random_text(rng: random.Random, n_lines: int) -> str:
    words = ["alpha", "Beta", "中文", "文本。", "，", "x1", "段落"]
    spaces = [" ", "  ", "\t", "\u3000", " \t "]
    lines = []
    for _ in range(n_lines):
        roll = rng.random()
        if roll < 0.25:
            lines.append(rng.choice(["", " ", "\t", "\u3000"]))
        else:
            parts = [rng.choice(words) for _ in range(rng.randint(1, 3))]
            line = rng.choice(["", " ", "\u3000"]) + rng.choice(spaces).join(parts) + rng.choice(["", " "])
            lines.append(line)
    return rng.choice(["\n", "\r\n"]).join(lines) + rng.choice(["", "\n", "\n\n"])


@pytest.mark.parametrize("unit", readers.UNITS)
@pytest.mark.parametrize("keep_newlines", [False, True])
def test_block_normalization_matches_line_by_line_rules(unit: str, keep_newlines: bool) -> None:
    rng = random.Random(f"{unit}{keep_newlines}")
    for _ in range(300):
        text = _random_text(rng, rng.randint(0, 12))
        expected = _reference(text, unit, keep_newlines)
        assert readers.samples_from_text(text, unit, keep_newlines) == expected, repr(text)


@pytest.mark.parametrize("unit", ["paragraph", "line"])
def test_streamed_blocks_never_split_a_paragraph(unit: str) -> None:
    rng = random.Random(unit)
    text = "\n\n".join(" ".join(rng.choice(["中文", "abc", "。"]) for _ in range(rng.randint(1, 5)))
                       for _ in range(400))
    blocks = list(readers.text_blocks(io.StringIO(text), 200, unit))
    assert len(blocks) > 10 and "".join(blocks) == text
    streamed = [s for block in blocks for s in readers.samples_from_text(block, unit, False)]
    assert streamed == readers.samples_from_text(text, unit, False)


def test_dedup_and_min_chars(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write(raw / "a.txt", "repeated paragraph\n\nshort\n\nunique one\n\nrepeated  paragraph\n")
    write(raw / "b.txt", "repeated paragraph\n\nunique two\n")
    report, lines = run(raw, tmp_path / "all.txt", dedup=True, min_chars=6)
    assert lines == ["repeated paragraph", "unique one", "unique two"]
    assert (report.duplicates_dropped, report.short_dropped, report.samples_written) == (2, 1, 3)
    report, lines = run(raw, tmp_path / "nodedup.txt")
    assert len(lines) == 6 and report.duplicates_dropped == 0


def test_jsonl_output_keeps_cjk_and_line_breaks(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.jsonl"
    preprocess(corpus, out, fmt="jsonl")
    raw_bytes = out.read_bytes()
    assert "第一段中文".encode() in raw_bytes  # ensure_ascii=False: no \\u escapes
    rows = [json.loads(line) for line in raw_bytes.decode("utf-8").splitlines()]
    assert all(set(row) == {"text"} for row in rows)
    assert raw_bytes.decode("utf-8").splitlines() == [json.dumps(row, ensure_ascii=False) for row in rows]
    assert rows[0]["text"] == "Hello world, this is\na wrapped paragraph."
    assert rows[2]["text"] == "第一段中文，\n没有空格。"


def test_deterministic_across_workers_and_chunks(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    paragraphs = [f"段落 {i} 的内容。\nparagraph {i} line two {'x' * (i % 37)}" for i in range(3000)]
    write(raw / "big.txt", "\n\n".join(paragraphs) + "\n")  # ~150 KB: many 4 KiB ranges below
    for i in range(6):
        write(raw / f"small_{i}.txt", f"small file {i}\n\nsecond {i}\n")
    make_csv(raw / "rows.csv", ["text"], [[f"csv row {i}"] for i in range(2000)])
    outputs = {}
    for name, kwargs in {"plain": {}, "w1_chunked": dict(chunk_bytes=4096),
                         "w2_chunked": dict(num_workers=2, chunk_bytes=4096),
                         "w2": dict(num_workers=2)}.items():
        out = tmp_path / f"{name}.txt"
        report = preprocess(raw, out, dedup=True, **kwargs)
        outputs[name] = out.read_bytes()
        assert report.files_read == 8
    assert len(set(outputs.values())) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp Arrow files left
    lines = outputs["plain"].decode("utf-8").splitlines()
    assert lines[:2] == ["段落 0 的内容。 paragraph 0 line two", "段落 1 的内容。 paragraph 1 line two x"]
    assert len(lines) == 3000 + 2000 + 12


def test_find_cut_prefers_blank_lines_and_never_splits_utf8(tmp_path: Path) -> None:
    data = ("一二三\n" * 50 + "\n" + "四五六\n" * 50).encode("utf-8")
    path = write(tmp_path / "x.txt", data)
    with open(path, "rb") as fh:
        assert readers.find_cut(fh, 10, len(data)) == data.index(b"\n\n") + 2
        no_blank = "中" * 100
        write(tmp_path / "y.txt", no_blank)
        with open(tmp_path / "y.txt", "rb") as fh2:
            cut = readers.find_cut(fh2, 4, len(no_blank.encode()))
            assert cut == len(no_blank.encode())  # EOF close: keep the rest whole


def test_overwrite_refused_then_allowed(corpus: Path, tmp_path: Path, capsys) -> None:
    out = write(tmp_path / "all.txt", "original\n")
    code = main(["--raw-dir", str(corpus), "--out-file", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"lora_ns.preprocess: error: {out}: --out-file: already exists — choose another path "
                   "or pass --overwrite\n")  # fileio.guard_output_file, as infer and evaluate say it
    assert out.read_text() == "original\n"
    assert main(["--raw-dir", str(corpus), "--out-file", str(out), "--quiet", "--overwrite"]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == EXPECTED


def test_an_out_file_inside_the_raw_dir_is_left_out_and_warned_of(corpus: Path, tmp_path: Path, capsys) -> None:
    """This run leaves its own output out; a next run writing elsewhere read it as one more raw file."""
    inside = corpus / "processed" / "all.txt"
    assert main(["--raw-dir", str(corpus), "--out-file", str(inside), "--quiet"]) == 0
    assert inside.read_text(encoding="utf-8").splitlines() == EXPECTED
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"lora_ns.preprocess: warning: {inside}: --out-file: inside --raw-dir"), line
    assert main(["--raw-dir", str(corpus), "--out-file", str(tmp_path / "all.txt"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_out_file_folder_and_bad_counts_are_one_line(corpus: Path, tmp_path: Path, capsys) -> None:
    """A folder as --out-file is named as such even without --overwrite (which would not help); counts
    are parsed as every command parses them (command_line.at_least)."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["--raw-dir", str(corpus), "--out-file", str(folder)]) == 2
    assert capsys.readouterr().err == (f"lora_ns.preprocess: error: {folder}: --out-file: is a folder — give a "
                                       "file path\n")
    out = tmp_path / "o.txt"
    for flag, value, minimum in (("--num-workers", "0", 1), ("--min-chars", "-1", 0)):
        assert main(["--raw-dir", str(corpus), "--out-file", str(out), flag, value]) == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: must be a whole number of at least {minimum}, got '{value}'" in err, err
        assert err.count("\n") == 1 and not out.exists()


def test_missing_raw_dir(tmp_path: Path, capsys) -> None:
    missing, out = tmp_path / "nope", tmp_path / "processed" / "all.txt"
    code = main(["--raw-dir", str(missing), "--out-file", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == (f"lora_ns.preprocess: error: --raw-dir {missing}: directory not found"
                            " — pass an existing folder\n")
    assert "Traceback" not in captured.err and not out.parent.exists()


def test_no_readable_files_writes_nothing(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    write(raw / "bad.docx", os.urandom(100))
    write(raw / "bad.zip", os.urandom(100))
    out = tmp_path / "out" / "all.txt"
    assert main(["--raw-dir", str(raw), "--out-file", str(out), "--num-workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no readable files" in err
    assert not out.exists() and not out.parent.exists()
    write(tmp_path / "empty" / "readme.md", "x")
    assert main(["--raw-dir", str(tmp_path / "empty"), "--out-file", str(out)]) == 2
    assert "no .txt/.csv/.docx/.zip files found (1 other files ignored)" in capsys.readouterr().err


def test_a_corpus_with_no_samples_is_an_error_not_an_empty_file(tmp_path: Path, capsys) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out" / "all.txt"
    write(raw / "a.txt", "")
    write(raw / "b.txt", "  \n\n \n")
    assert main(["--raw-dir", str(raw), "--out-file", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no samples to write: the 2 files read hold no text" in err
    assert not out.exists() and not out.parent.exists()
    write(raw / "b.txt", "tiny\n\nsmall\n")
    assert main(["--raw-dir", str(raw), "--out-file", str(out), "--min-chars", "10"]) == 2
    assert "all 2 are shorter than --min-chars 10 — lower --min-chars" in capsys.readouterr().err
    assert not out.exists()
    # one shard of many may hold only short or empty files: it writes its (empty) part for the concatenation
    assert main(["--raw-dir", str(raw), "--out-file", str(out), "--min-chars", "10", "--shard", "0/2"]) == 0
    assert out.read_text() == ""


def test_raw_dir_is_a_file(tmp_path: Path, capsys) -> None:
    not_dir = write(tmp_path / "file.txt", "x")
    assert main(["--raw-dir", str(not_dir), "--out-file", str(tmp_path / "o.txt")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_module_runs_as_script_and_imports_nothing_heavy(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.txt"
    proc = subprocess.run([sys.executable, "-m", "lora_ns.preprocess", "--raw-dir", str(corpus),
                           "--out-file", str(out), "--num-workers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8").splitlines() == EXPECTED
    heavy = {"torch", "transformers", "datasets", "numpy", "peft", "pyarrow"}
    for path in Path(pp.__file__).parent.glob("*.py"):  # module level: --help and checks stay fast
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in tree.body
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & heavy, path
    code = "import sys, lora_ns.preprocess as p; p.make_parser(); print(' '.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert loaded.returncode == 0 and "lora_ns.preprocess.cli" in loaded.stdout.split(), loaded.stderr
    assert not set(loaded.stdout.split()) & heavy


def test_default_worker_count_runs_a_small_corpus_in_process(corpus: Path, tmp_path: Path) -> None:
    """Without --num-workers a corpus under BYTES_PER_WORKER runs in-process: `datasets` (whose pool costs
    seconds to start) is never imported. Bigger corpora get one worker per BYTES_PER_WORKER."""
    code = ("import sys; from lora_ns.preprocess import main; "
            f"rc = main(['--raw-dir', {str(corpus)!r}, '--out-file', {str(tmp_path / 'o.txt')!r}, '--quiet']); "
            "print(rc, 'datasets' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split()[-2:] == ["0", "False"], proc.stderr
    assert (tmp_path / "o.txt").read_text(encoding="utf-8").splitlines() == EXPECTED


def test_docx_needs_the_extra_with_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    raw = tmp_path / "raw"
    docx_bytes = make_docx(tmp_path / "m.docx", ["member text"]).read_bytes()
    write(raw / "a.docx", docx_bytes)
    monkeypatch.setitem(sys.modules, "docx", None)  # `import docx` now fails as if it were not installed
    out = tmp_path / "out" / "all.txt"
    assert main(["--raw-dir", str(raw), "--out-file", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"lora_ns.preprocess: error: {raw / 'a.docx'}: reading .docx needs "
                                       "python-docx — pip install lora_ns[preprocess]\n")
    assert not out.parent.exists()
    (raw / "a.docx").unlink()
    with zipfile.ZipFile(write(raw / "z.zip", b""), "w") as zf:  # inside an archive: that member is skipped
        zf.writestr("m.docx", docx_bytes)
        zf.writestr("ok.txt", "kept\n")
    report, lines = run(raw, out)
    assert lines == ["kept"]
    assert dict(report.files_skipped) == {"z.zip::m.docx": "reading .docx needs python-docx — pip install "
                                          "lora_ns[preprocess]"}


def test_shards_concatenate_to_the_whole_run(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    for i in range(7):  # different sizes, so the byte-balanced cut is not just a count
        write(raw / f"f{i}.txt", "".join(f"file {i} paragraph {j}\n\n" for j in range(10 * (i + 1))))
    _, whole = run(raw, tmp_path / "all.txt")
    parts, read = [], 0
    for i in range(3):
        report, lines = run(raw, tmp_path / f"shard{i}.txt", shard=(i, 3), num_workers=2)
        assert 0 < len(lines) < len(whole)
        parts, read = parts + lines, read + report.files_read
    assert parts == whole and read == 7
    assert main(["--raw-dir", str(raw), "--out-file", str(tmp_path / "x.txt"), "--shard", "3/3"]) == 2
    assert "expected I/N with 0 <= I < N, got '3/3'" in capsys.readouterr().err


def test_rows_of_a_unit_that_fails_later_are_taken_back(tmp_path: Path, monkeypatch) -> None:
    """A CSV that breaks after 1 MB of rows was written, and an archive member whose UTF-8 (then
    GB18030) attempt fails after several 4 KiB blocks: their rows, dedup hashes and short counts go."""
    raw = tmp_path / "raw"
    first = "csv row 0 " + "x" * 100
    make_csv(raw / "a.csv", ["text"], [[f"csv row {i} " + "x" * 100] for i in range(12000)] + [["y" * 5000]])
    write(raw / "b.txt", first + "\n")  # also in the failed CSV: dedup must have forgotten it
    member = "ab\n\n" + "".join(f"member para {i}\n\n" for i in range(2000))
    with zipfile.ZipFile(write(raw / "c.zip", b""), "w") as zf:
        zf.writestr("m.txt", member.encode() + b"caf\xe9\n")
    monkeypatch.setattr(readers, "CSV_FIELD_LIMIT", 1000)  # the last CSV row is now malformed
    report, lines = run(raw, tmp_path / "all.txt", dedup=True, chunk_bytes=4096, min_chars=3)
    assert lines == [first] + [f"member para {i}" for i in range(2000)] + ["café"]
    assert list(dict(report.files_skipped)) == ["a.csv"]
    assert "malformed CSV near line 12002" in report.files_skipped[0][1]
    assert dict(report.fallback_encodings) == {"c.zip::m.txt": "latin-1"}
    assert (report.samples_written, report.duplicates_dropped, report.short_dropped) == (2002, 0, 1)
