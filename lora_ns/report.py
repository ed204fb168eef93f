"""End-of-training report: loss-curve PNG and a short human summary in the output dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_report(log_history: list[dict[str, Any]], output_dir: str | Path, summary: dict[str, Any]) -> None:
    """Write the loss curve and summary (filled in by the user-experience work)."""
