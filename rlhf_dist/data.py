"""Prompt data: loading with clear errors, and a resumable, seeded cursor over epochs."""

from __future__ import annotations

import json
import random
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


def load_prompts(path: str | Path, key: str = "prompt") -> tuple[list[str], list[int]]:
    """Prompts from a JSONL file, one object per line with a string field ``key``;
    returns the prompts and their line numbers (for error messages)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.prompts: file {str(p)!r} does not exist")
    prompts, lines = [], []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or key not in obj:
                raise DataError(f"{p}:{lineno}: missing field {key!r} (data.prompt_key)")
            text = obj[key]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{p}:{lineno}: field {key!r} must be a non-empty string")
            prompts.append(text)
            lines.append(lineno)
    if not prompts:
        raise DataError(f"data.prompts: file {str(p)!r} holds no prompts")
    return prompts, lines


class PromptCursor:
    """Walks a dataset in seeded shuffled epochs; its state is two integers (for resume)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size <= 0:
            raise ValueError("PromptCursor needs at least one prompt")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order()
            k = min(n - len(out), self.size - self.index)
            out.extend(self._order[self.index : self.index + k])
            self.index += k
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order()
