"""Turn a folder of raw documents into one clean text file for continued pretraining.

    python -m lora_ns.preprocess --raw-dir data/raw --out-file data/processed/all_text.txt --num-workers 16

Reads ``.txt``, ``.csv``, ``.docx`` and ``.zip`` archives of those (in memory, never extracted) found
recursively under ``--raw-dir``; other files are ignored and counted, and a file that cannot be read is
skipped with a reason in the report (``--help`` lists the units, formats and encodings).

* `readers`: the per-file readers and text normalization (what runs in a worker).
* `pipeline`: tasks (a file, or a ~4 MiB range of a large .txt cut at a blank line) run by `datasets`
  workers, written in task order (byte-identical for any ``--num-workers``) through `lora_ns.fileio`.
* `cli`: flags and checks. ``--shard I/N`` splits a corpus too large for one machine by file
  (contiguous parts of about equal bytes, in path order); the N outputs, concatenated in order, are
  what one run would write (with ``--dedup``, each shard dedups only within itself).
"""

from lora_ns.preprocess.cli import main, make_parser, preprocess
from lora_ns.preprocess.pipeline import PreprocessReport

__all__ = ["PreprocessReport", "main", "make_parser", "preprocess"]
