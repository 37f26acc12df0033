"""Data: loading with clear errors, and a resumable, seeded cursor over epochs.

A source is a JSONL file (read here, line by line, errors naming the line), or anything
``datasets`` reads: a JSON, CSV, parquet or arrow file, a folder written by ``save_to_disk``
(a ``Dataset``, or a ``DatasetDict`` with ``data.split``), or a hub dataset id with a split.
Those are Arrow tables, memory-mapped: prompts are read from them row by row when a step takes
them (:class:`Column`), never all into Python lists. Errors name the source, the row (0-based,
as ``datasets`` indexes it) and the field.
"""

from __future__ import annotations

import json
import random
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_dist.chat import value_problem


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
    allow_messages: bool = False,
) -> tuple[list[dict], list[int], int]:
    """Records with non-empty string ``fields`` (or, with ``allow_messages``, message lists,
    ``rlhf_dist.chat``) from a JSONL file.

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
                bad = [(f, r) for f in fields if (r := value_problem(obj[f], allow_messages))]
                if bad:
                    obj = DataError(f"{p}:{lineno}: field {bad[0][0]!r} {bad[0][1]}")
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


# ----------------------------------------------------------------------------- datasets

DATASETS_SUFFIXES = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


def is_jsonl(source: str | Path) -> bool:
    return Path(str(source)).suffix.lower() == ".jsonl"


def looks_like_hub_id(source: str) -> bool:
    """``name`` or ``org/name``: not a path (no leading ``.``, ``/``, ``~``, at most one
    slash, no file suffix this loader knows)."""
    s = str(source)
    return (
        bool(s)
        and not s.startswith((".", "/", "~"))
        and s.count("/") <= 1
        and Path(s).suffix.lower() not in (*DATASETS_SUFFIXES, ".jsonl", ".arrow")
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def open_dataset(source: str | Path, config_key: str, split: str = "train"):
    """A ``datasets.Dataset`` (Arrow, memory-mapped) from a JSON/CSV/parquet/arrow file, a
    ``save_to_disk`` folder (a ``DatasetDict``'s ``split``), or a hub id's ``split``.
    Every failure is a :class:`DataError` naming ``config_key`` and the source."""
    import datasets

    src = str(source)
    p = Path(src).expanduser()
    try:
        if p.is_dir():
            if (p / "dataset_dict.json").is_file():
                dd = datasets.load_from_disk(str(p))
                if split not in dd:
                    raise DataError(
                        f"{config_key}: dataset folder {src!r} has no split {split!r} (its "
                        f"splits: {', '.join(dd)}; set data.split)"
                    )
                return dd[split]
            if (p / "state.json").is_file():
                return datasets.load_from_disk(str(p))
            raise DataError(
                f"{config_key}: folder {src!r} is not a dataset written by save_to_disk "
                f"(it has no state.json or dataset_dict.json)"
            )
        if p.is_file():
            suffix = p.suffix.lower()
            if suffix == ".arrow":
                return datasets.Dataset.from_file(str(p))
            if suffix not in DATASETS_SUFFIXES:
                raise DataError(
                    f"{config_key}: file {src!r}: unknown format {suffix or '(no suffix)'!r} "
                    f"(.jsonl, .json, .csv, .parquet, .arrow, or a save_to_disk folder)"
                )
            split_of_file = split if split.startswith("train") else "train"
            return datasets.load_dataset(
                DATASETS_SUFFIXES[suffix], data_files=str(p), split=split_of_file
            )
        if looks_like_hub_id(src):
            try:
                return datasets.load_dataset(src, split=split)
            except Exception as e:
                raise DataError(
                    f"{config_key}: cannot load the hub dataset {src!r} (split {split!r}): "
                    f"{_first_line(e)}"
                ) from None
    except DataError:
        raise
    except Exception as e:  # the format's reader failed: name the file, not the library
        empty = "corresponds to no data" in str(e) or (p.is_dir() and isinstance(e, IndexError))
        if empty:  # how datasets reports a file or folder with no rows
            raise DataError(f"{config_key}: {src} holds no rows (the dataset is empty)") from None
        raise DataError(f"{config_key}: cannot read {src!r}: {_first_line(e)}") from None
    raise DataError(f"{config_key}: file {src!r} does not exist")


def _require_columns(ds, source: str, config_key: str, columns: list[str], what: str) -> None:
    for c in columns:
        if c not in ds.column_names:
            raise DataError(
                f"{config_key}: {source} has no column {c!r} ({what}; its columns: "
                f"{', '.join(ds.column_names) or 'none'})"
            )


class Column(Sequence):
    """One column of an Arrow dataset, read row by row when indexed (the table stays
    memory-mapped; nothing is copied into Python lists)."""

    def __init__(self, ds, name: str):
        self.name = name
        self._ds = ds.select_columns([name])

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._ds[int(i)][self.name]

    def head(self, n: int) -> Column:
        return Column(self._ds.select(range(min(n, len(self)))), self.name)

    def batches(self, size: int = 1024) -> Iterator[list]:
        for b in self._ds.iter(batch_size=size):
            yield b[self.name]


class Mapped(Sequence):
    """``fn`` of each item of ``source``, computed when indexed (prompts rendered row by row
    from a memory-mapped dataset)."""

    def __init__(self, source: Sequence, fn: Callable):
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.fn(self.source[i])

    def head(self, n: int) -> Mapped:
        src = self.source.head(n) if hasattr(self.source, "head") else self.source[:n]
        return Mapped(src, self.fn)


def _messages_feature(feature) -> bool:
    """Whether an Arrow column's type is a list (of messages), not a string."""
    return type(feature).__name__ in ("List", "LargeList", "Sequence") or isinstance(feature, list)


# ----------------------------------------------------------------------------- prompts


@dataclass
class PromptRows:
    """A prompt source: the prompts (strings or message lists), and every other field of its
    rows as columns.

    ``fields[name][i]`` is row ``i``'s value of ``name`` (None where the row lacks it, and
    ``missing[name]`` is then the first such line), for the reward functions that take the
    data row's fields (``function(prompts, responses, answer=...)``). A JSONL file is held in
    lists; a ``datasets`` source in :class:`Column` views (``jsonl`` False).
    """

    path: str
    prompts: Sequence
    lines: Sequence[int]  # line number of each row (JSONL), or the row index
    fields: dict[str, Sequence] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    jsonl: bool = True
    any_messages: bool = False
    key: str = "prompt"

    def where(self, i: int) -> str:
        """Row ``i`` as an error names it: ``file:line``, or ``source row i``."""
        return f"{self.path}:{self.lines[i]}" if self.jsonl else f"{self.path} row {i}"

    def head(self, n: int) -> PromptRows:
        """The first ``n`` rows."""
        if not self.jsonl:
            fields = {k: v.head(n) for k, v in self.fields.items()}
            prompts = self.prompts.head(n)
            return PromptRows(
                self.path, prompts, range(len(prompts)), fields, {}, False, self.any_messages,
                self.key,
            )  # fmt: skip
        fields = {k: v[:n] for k, v in self.fields.items()}
        last = self.lines[:n][-1] if n > 0 else 0
        missing = {k: line for k, line in self.missing.items() if line <= last}
        return PromptRows(
            self.path, self.prompts[:n], self.lines[:n], fields, missing, True,
            any(isinstance(p, list) for p in self.prompts[:n]), self.key,
        )  # fmt: skip

    def batches(self, size: int = 1024) -> Iterator[list]:
        """The prompts in batches (a dataset is read batch by batch)."""
        if isinstance(self.prompts, Column):
            yield from self.prompts.batches(size)
        else:
            for i in range(0, len(self.prompts), size):
                yield list(self.prompts[i : i + size])


def load_prompt_rows(
    path: str | Path, key: str = "prompt", split: str = "train", config_key: str = "data.prompts"
) -> PromptRows:
    """Prompts, one row each with a field ``key`` (a string or a message list), and the rows'
    other fields. A JSONL file's bad line is refused here, naming the file and line; a
    dataset's columns are checked here and its rows as the preflight reads them."""
    if not is_jsonl(path):
        ds = open_dataset(path, config_key, split)
        _require_columns(ds, str(path), config_key, [key], "data.prompt_key")
        if len(ds) == 0:
            raise DataError(f"{config_key}: {path} holds no prompts (the dataset is empty)")
        fields = {c: Column(ds, c) for c in ds.column_names if c != key}
        any_messages = _messages_feature(ds.features[key])
        return PromptRows(
            str(path), Column(ds, key), range(len(ds)), fields, {}, False, any_messages, key
        )
    try:
        records, lines, _ = load_jsonl(
            path, [key], "data.prompt_key", keep_all=True, allow_messages=True
        )
    except DataError as e:
        msg = str(e).replace("data.prompt_key: file", f"{config_key}: file")
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
    prompts = [r[key] for r in records]
    any_messages = any(isinstance(p, list) for p in prompts)
    return PromptRows(str(path), prompts, lines, fields, missing, True, any_messages, key)


def load_prompts(path: str | Path, key: str = "prompt") -> tuple[list[str], list[int]]:
    """Prompts from a JSONL file, one object per line with a string field ``key``;
    returns the prompts and their line numbers (for error messages)."""
    rows = load_prompt_rows(path, key)
    return rows.prompts, rows.lines


# ----------------------------------------------------------------------------- SFT and RM


def _rows(path, config_key: str, split: str) -> Iterator[tuple[str, dict | DataError]]:
    """(where, row) for each row of a source: JSONL lines (a bad line as its DataError) or a
    dataset's rows."""
    if is_jsonl(path):
        for lineno, obj in _records(Path(path), config_key):
            yield f"{path}:{lineno}", obj
        return
    ds = open_dataset(path, config_key, split)
    if len(ds) == 0:
        raise DataError(f"{config_key}: {path} holds no usable records (the dataset is empty)")
    for i, row in enumerate(ds):
        yield f"{path} row {i}", row


def _load_records(
    path,
    config_key: str,
    split: str,
    skip_bad: bool,
    normalise: Callable[[dict], dict | str],
    wheres: list[str] | None = None,
) -> tuple[list[dict], int]:
    """``normalise(row)`` of every row: the record, or why the row is refused (raised as a
    DataError naming the row, or with ``skip_bad`` skipped and counted). ``wheres``, when
    given, receives each record's row as errors name it."""
    records, skipped = [], 0
    for where, row in _rows(path, config_key, split):
        if not isinstance(row, DataError):
            rec = normalise(row)
            if isinstance(rec, str):
                row = DataError(f"{where}: {rec.replace('{key}', config_key)}")
        if isinstance(row, DataError):
            if not skip_bad:
                raise row
            skipped += 1
            continue
        records.append(rec)
        if wheres is not None:
            wheres.append(where)
    if not records:
        raise DataError(f"{config_key}: file {str(path)!r} holds no usable records")
    return records, skipped


def _field(row: dict, name: str) -> str | None:
    """Why field ``name`` of ``row`` is unusable (None when it is a string or messages)."""
    if name not in row or row[name] is None:
        return f"missing field {name!r} ({{key}})"
    reason = value_problem(row[name])
    return f"field {name!r} {reason}" if reason else None


def _demonstration(row: dict) -> dict | str:
    """``{"prompt", "response"}`` (strings or messages), or a whole conversation
    ``{"messages"}`` with at least one assistant turn."""
    if row.get("messages") is not None and row.get("prompt") is None:
        if reason := _field(row, "messages"):
            return reason
        if not any(m["role"] == "assistant" for m in row["messages"]):
            return "field 'messages' has no assistant turn to train on"
        return {"messages": row["messages"]}
    for name in ("prompt", "response"):
        if reason := _field(row, name):
            return reason
    return {"prompt": row["prompt"], "response": row["response"]}


def split_transcripts(chosen, rejected) -> tuple | str:
    """HH-style comparison: two whole transcripts split at their longest common prefix
    into (prompt, chosen response, rejected response), or why they cannot be.

    Message lists split between messages; strings split at the last whitespace inside the
    common prefix (so no word is cut), the prompt and responses stripped of the space
    between them."""
    if isinstance(chosen, list) != isinstance(rejected, list):
        return "'chosen' and 'rejected' must both be strings or both message lists"
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            return "'chosen' and 'rejected' share no prefix (and there is no 'prompt' field)"
        if not c or not r:
            return "one of 'chosen' and 'rejected' is the other's prefix: no response to compare"
        if not any(m["role"] == "user" for m in prompt):
            return "the shared prefix of 'chosen' and 'rejected' has no user turn"
        return prompt, c, r
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n < len(chosen) or n < len(rejected):  # cut at a word boundary
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
    prompt, c, r = chosen[:n].rstrip(), chosen[n:].strip(), rejected[n:].strip()
    if not prompt:
        return "'chosen' and 'rejected' share no prefix (and there is no 'prompt' field)"
    if not c or not r:
        return "one of 'chosen' and 'rejected' is the other's prefix: no response to compare"
    return prompt, c, r


def _pair(row: dict) -> dict | str:
    for name in ("chosen", "rejected"):
        if reason := _field(row, name):
            return reason
    if row.get("prompt") is None:
        split = split_transcripts(row["chosen"], row["rejected"])
        if isinstance(split, str):
            return split
        prompt, chosen, rejected = split
    else:
        if reason := _field(row, "prompt"):
            return reason
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if chosen == rejected:
        return "'chosen' and 'rejected' are identical"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_demonstrations(
    path: str | Path, skip_bad: bool = False, split: str = "train", wheres: list | None = None
) -> tuple[list[dict], int]:
    """SFT demonstrations: ``{"prompt": ..., "response": ...}`` per row (each a string or a
    message list), or ``{"messages": [...]}``, a whole conversation (trained on its assistant
    turns)."""
    return _load_records(path, "sft.data", split, skip_bad, _demonstration, wheres)


def load_preference_pairs(
    path: str | Path, skip_bad: bool = False, split: str = "train", wheres: list | None = None
) -> tuple[list[dict], int]:
    """Reward-model comparisons: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` per row
    (strings or message lists), or HH-style whole transcripts ``{"chosen", "rejected"}`` split
    at their longest common prefix (:func:`split_transcripts`)."""
    return _load_records(path, "rm.data", split, skip_bad, _pair, wheres)


# ----------------------------------------------------------------------------- the cursor


class PromptCursor:
    """Walks a dataset in seeded shuffled epochs; its state is two integers (for resume).

    An epoch's order is a compact ``array`` of row indices (8 bytes a row; ``random.shuffle``
    gives it the same permutation a list would get), or without shuffling a ``range``."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size <= 0:
            raise ValueError("PromptCursor needs at least one prompt")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> Sequence[int]:
        if not self.shuffle:
            return range(self.size)
        order = array("q", range(self.size))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        out: list[int] = []
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
