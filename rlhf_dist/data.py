"""Prompt data: loading with clear errors, and a resumable, seeded cursor over epochs."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


def _records(path: Path, config_key: str) -> Iterator[tuple[int, dict | DataError]]:
    """(line number, JSON object or the DataError for that line) for each non-blank line."""
    if not path.is_file():
        raise DataError(f"{config_key}: file {str(path)!r} does not exist")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, DataError(f"{path}:{lineno}: not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                yield lineno, DataError(f"{path}:{lineno}: expected a JSON object")
                continue
            yield lineno, obj


def load_jsonl(
    path: str | Path,
    fields: list[str],
    config_key: str,
    skip_bad: bool = False,
    check: Callable[[dict], str | None] | None = None,
    keep_all: bool = False,
) -> tuple[list[dict], list[int], int]:
    """Records with non-empty string ``fields`` from a JSONL file.

    A bad line (not UTF-8, not JSON, a field missing or empty, or ``check`` returning a
    reason) raises :class:`DataError` naming the file and line, or with ``skip_bad`` is
    skipped and counted. A record holds ``fields`` only, or with ``keep_all`` every field of
    its line. Returns (records, their line numbers, number skipped).
    """
    p = Path(path)
    records, lines, skipped = [], [], 0
    for lineno, obj in _records(p, config_key):
        if not isinstance(obj, DataError):
            missing = [f for f in fields if f not in obj]
            if missing:
                obj = DataError(f"{p}:{lineno}: missing field {missing[0]!r} ({config_key})")
            else:
                empty = [f for f in fields if not isinstance(obj[f], str) or not obj[f].strip()]
                if empty:
                    obj = DataError(f"{p}:{lineno}: field {empty[0]!r} must be a non-empty string")
                elif check is not None and (reason := check(obj)):
                    obj = DataError(f"{p}:{lineno}: {reason}")
        if isinstance(obj, DataError):
            if not skip_bad:
                raise obj
            skipped += 1
            continue
        records.append(dict(obj) if keep_all else {f: obj[f] for f in fields})
        lines.append(lineno)
    if not records:
        raise DataError(f"{config_key}: file {str(p)!r} holds no usable records")
    return records, lines, skipped


@dataclass
class PromptRows:
    """A prompt file: the prompts, and every other field of its rows as columns.

    ``fields[name][i]`` is row ``i``'s value of ``name`` (None where the row lacks it, and
    ``missing[name]`` is then the first such line), for the reward functions that take the
    data row's fields (``function(prompts, responses, answer=...)``).
    """

    path: str
    prompts: list[str]
    lines: list[int]  # line number of each row (for error messages)
    fields: dict[str, list] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)

    def head(self, n: int) -> PromptRows:
        """The first ``n`` rows."""
        fields = {k: v[:n] for k, v in self.fields.items()}
        last = self.lines[:n][-1] if n > 0 else 0
        missing = {k: line for k, line in self.missing.items() if line <= last}
        return PromptRows(self.path, self.prompts[:n], self.lines[:n], fields, missing)


def load_prompt_rows(path: str | Path, key: str = "prompt") -> PromptRows:
    """Prompts from a JSONL file, one object per line with a string field ``key``, and the
    rows' other fields (a bad line is refused, naming the file and line)."""
    try:
        records, lines, _ = load_jsonl(path, [key], "data.prompt_key", keep_all=True)
    except DataError as e:
        msg = str(e).replace("data.prompt_key: file", "data.prompts: file")
        raise DataError(msg.replace("holds no usable records", "holds no prompts")) from None
    names: dict[str, None] = {}  # every field of any row, in first-seen order
    for r in records:
        names.update(dict.fromkeys(k for k in r if k != key))
    fields = {name: [r.get(name) for r in records] for name in names}
    missing = {}
    for name in names:
        first = next((line for r, line in zip(records, lines) if name not in r), None)
        if first is not None:
            missing[name] = first
    return PromptRows(str(path), [r[key] for r in records], lines, fields, missing)


def load_prompts(path: str | Path, key: str = "prompt") -> tuple[list[str], list[int]]:
    """Prompts from a JSONL file, one object per line with a string field ``key``;
    returns the prompts and their line numbers (for error messages)."""
    rows = load_prompt_rows(path, key)
    return rows.prompts, rows.lines


def load_demonstrations(path: str | Path, skip_bad: bool = False) -> tuple[list[dict], int]:
    """SFT demonstrations: ``{"prompt": ..., "response": ...}`` per line."""
    records, _, skipped = load_jsonl(path, ["prompt", "response"], "sft.data", skip_bad)
    return records, skipped


def load_preference_pairs(path: str | Path, skip_bad: bool = False) -> tuple[list[dict], int]:
    """Reward-model comparisons: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` per line."""

    def distinct(r: dict) -> str | None:
        return "'chosen' and 'rejected' are identical" if r["chosen"] == r["rejected"] else None

    records, _, skipped = load_jsonl(
        path, ["prompt", "chosen", "rejected"], "rm.data", skip_bad, distinct
    )
    return records, skipped


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
