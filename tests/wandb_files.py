"""Read an offline wandb run back without network: the .wandb file is a leveldb-style log of protobuf records.

Framing: a 7-byte header (':W&B' + magic + version), then 32 KiB blocks of chunks `<crc u32><len u16><type u8>`
(1 full, 2 first, 3 middle, 4 last); a chunk never crosses a block, whose tail may be zero padding.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    i, pending = HEADER, b""
    while i + HEADER <= len(data):
        if BLOCK - i % BLOCK < HEADER:
            i += BLOCK - i % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[i:i + HEADER])
        chunk, i = data[i + HEADER:i + HEADER + length], i + HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(items) -> dict:
    return {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in items}


def read_run(path: Path) -> dict:
    """{'id', 'group', 'config', 'history': [rows], 'summary'} of one run-<id>.wandb file."""
    out = {"id": None, "group": None, "config": {}, "history": [], "summary": {}}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["group"] = r.run.run_id, r.run.run_group
            out["config"].update(_items(r.run.config.update))
        elif kind == "config":
            out["config"].update(_items(r.config.update))
        elif kind == "history":
            out["history"].append(_items(r.history.item))
        elif kind == "summary":
            out["summary"].update(_items(r.summary.update))
    return out
