"""Read what a wandb run logged from its ``run-*.wandb`` file (wandb ships no reader).

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then
32 KiB blocks of records, each with a 7-byte header (CRC32, length, type: 1 full, 2 first,
3 middle, 4 last), each record a ``wandb_internal_pb2.Record`` protobuf.
"""

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def raw_records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, out, partial = HEADER, [], b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            out.append(partial + chunk)
        elif kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
    return out


def history(path: Path) -> list[dict]:
    """Every ``history`` record (one per ``run.log`` call) as a dict of key -> value."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in raw_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_file(run_dir: Path) -> Path:
    files = sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"))
    assert files, f"no wandb run file under {run_dir}"
    return files[-1]
