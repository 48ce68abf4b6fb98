"""Read an offline W&B run's ``run-*.wandb`` file (a LevelDB-style log of protobuf records) to check what it holds."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7  # every chunk: crc32 (4 bytes), length (2), kind (1); the file starts with ":W&B", a magic and a version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[object]:
    """Every ``wandb_internal_pb2.Record`` in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # too little room for a chunk header: the writer padded to the next block
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            position += left_in_block
            continue
        pending += data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(path: Path, timeout: float = 60.0) -> list[object]:
    """The records of a finished run; waits for its ``exit`` record (W&B's service may still be writing the file
    when ``run.finish()`` returns)."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(records(path))
        if any(record.WhichOneof("record_type") == "exit" for record in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def artifacts(path: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """The artifacts a finished run logged: name -> (type, {file name in the artifact: staged local copy})."""
    found = {}
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "artifact":
            artifact = record.artifact
            found[artifact.name] = (artifact.type, {entry.path: entry.local_path
                                                    for entry in artifact.manifest.contents})
    return found
