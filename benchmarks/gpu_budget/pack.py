"""Shrink a Lightning checkpoint for the trip back: weights to fp16, no optimizer/loop state; split in 15 MiB parts."""
import io
import sys
from pathlib import Path

import torch

ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
record = torch.load(ckpt, map_location="cpu", weights_only=True)
for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):
    record.pop(key, None)
record["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in record["state_dict"].items()}
buffer = io.BytesIO()
torch.save(record, buffer)
data = buffer.getvalue()
part = 15 * 2**20
for i in range(0, len(data), part):
    (out.parent / f"{out.name}.part{i // part}").write_bytes(data[i:i + part])
print(f"packed {ckpt} -> {out}.part* ({len(data)} bytes), epoch {record.get('epoch')}")
