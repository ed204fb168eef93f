"""Token-length statistics: percentiles for `validate`, and how much padding packing saves.

`padding_stats` compares the two ways TRL batches causal-LM rows:

- without packing, each batch of ``batch_size`` rows is padded to its longest row;
- with ``packing=True, packing_strategy="bfd"``, TRL bins rows into sequences of at most
  ``max_length`` tokens (best-fit decreasing, `trl.pack_dataset`) and its padding-free collator
  concatenates a batch of bins into one row, so no padding token is computed at all.
"""

from __future__ import annotations

import math
from typing import Sequence

SFT_DEFAULT_MAX_LENGTH = 1024  # SFTConfig.max_length's default


def length_summary(lengths: Sequence[int], max_length: int | None) -> dict[str, int]:
    """p50 / p95 / max of the token lengths and how many exceed `max_length`."""
    import numpy as np

    values = np.asarray(lengths)
    return {"count": int(values.size), "p50": int(np.percentile(values, 50)), "p95": int(np.percentile(values, 95)),
            "max": int(values.max()), "over": int((values > max_length).sum()) if max_length else 0}


def unpacked_padding(sizes: Sequence[int], batch_size: int) -> int:
    """Pad tokens when consecutive batches of `batch_size` rows are each padded to their longest row."""
    return sum(len(chunk) * max(chunk) - sum(chunk)
               for chunk in (sizes[i:i + batch_size] for i in range(0, len(sizes), batch_size)))


def packed_rows(lengths: Sequence[int], max_length: int) -> int:
    """How many sequences TRL's BFD packing makes from rows of these lengths."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from trl import pack_dataset

    sizes = np.minimum(np.asarray(lengths, dtype=np.int64), max_length)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    ids = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(int(offsets[-1]), dtype=np.int8)))
    packed = pack_dataset(Dataset(pa.table({"input_ids": ids})), max_length, "bfd")
    return len(packed)


def padding_stats(lengths: Sequence[int], batch_size: int, max_length: int | None = SFT_DEFAULT_MAX_LENGTH) -> dict:
    """Padded tokens per epoch without packing (batches of `batch_size` in the given order, each padded to
    its longest row) versus with BFD packing + padding-free batches (none); rows longer than
    `max_length` count as truncated. Fractions are padding / all tokens computed."""
    limit = max_length or max(lengths)
    sizes = [min(int(n), limit) for n in lengths]
    tokens = sum(sizes)
    padded = unpacked_padding(sizes, batch_size)
    rows = packed_rows(sizes, limit) if sizes else 0
    return {
        "sequences": len(sizes), "tokens": tokens, "batch_size": batch_size, "max_length": limit,
        "padded_tokens_unpacked": padded, "padding_fraction_unpacked": padded / (tokens + padded) if tokens else 0.0,
        "batches_unpacked": math.ceil(len(sizes) / batch_size),
        "padded_tokens_packed": 0, "padding_fraction_packed": 0.0,
        "packed_rows": rows, "batches_packed": math.ceil(rows / batch_size),
    }


def describe_padding(stats: dict) -> str:
    """One line for a log: what packing saves."""
    return (f"padding: {stats['padding_fraction_unpacked']:.0%} of computed tokens without packing "
            f"({stats['padded_tokens_unpacked']:,} pad tokens, {stats['batches_unpacked']} batches of "
            f"{stats['batch_size']}); 0% with packing ({stats['sequences']} rows -> {stats['packed_rows']} packed "
            f"sequences of <= {stats['max_length']} tokens, {stats['batches_packed']} batches)")
