"""``metrics.jsonl``: one JSON object per step (the same keys as wandb), flushed as written."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.f = self.path.open("a")

    def write(self, metrics: dict) -> None:
        self.f.write(json.dumps(metrics) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
