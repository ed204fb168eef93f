"""Turn a folder of raw documents into one clean text file for continued pretraining.

    python -m lora_ns.preprocess --raw-dir data/raw --out-file data/processed/all_text.txt --num-workers 16

Reads ``.txt``, ``.csv`` (one text column), ``.docx`` (needs ``pip install lora_ns[preprocess]``) and
``.zip`` archives of those (read in memory, never extracted) found recursively under ``--raw-dir``;
hidden files and other extensions are ignored and counted. Each sample is one paragraph by default
(``--unit file|paragraph|line``), whitespace normalized, written one per line (``--format txt``) or as
``{"text": ...}`` JSON lines. CJK-safe: joining the lines of a hard-wrapped paragraph adds no space
between two CJK characters. Decoding tries UTF-8 (BOM tolerated), GB18030, Latin-1 per unit of work;
a file that cannot be read is skipped with a reason in the report.

* `readers`: the per-file readers and text normalization (what runs in a worker).
* `pipeline`: tasks (a file, or a ~4 MiB range of a large .txt cut at a blank line) run by `datasets`
  workers, written in task order (byte-identical for any ``--num-workers``) through `lora_ns.fileio`.
* `cli`: flags and checks. ``--shard I/N`` splits a corpus too large for one machine by file
  (contiguous parts of about equal bytes, in path order); the N outputs, concatenated in order, are
  what one run would write (with ``--dedup``, each shard dedups only within itself).
"""

from lora_ns.preprocess.cli import FORMATS, main, make_parser, preprocess
from lora_ns.preprocess.pipeline import PreprocessReport
from lora_ns.preprocess.readers import BINARY, UNITS, find_cut, samples_from_text, text_blocks

__all__ = ["BINARY", "FORMATS", "UNITS", "PreprocessReport", "find_cut", "main", "make_parser", "preprocess",
           "samples_from_text", "text_blocks"]
