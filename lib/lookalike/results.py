"""What every stage hands back: its counts and metrics, logged and written to the `runs` table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageResult:
    """Counts and metrics of one stage run."""

    stage: str
    rows_in: int
    rows_out: int
    metrics: dict[str, float] = field(default_factory=dict)
