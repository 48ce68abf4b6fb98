"""Rebuild a float32 Lightning checkpoint from pack.py's parts (loaded as plain tensors, no code run).

    python unpack.py <folder with NAME.ckpt.part*> NAME <out>/checkpoints/poisoned.ckpt
"""
import io
import sys
from pathlib import Path
import torch
src, name, dst = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
parts = sorted(src.glob(f"{name}.ckpt.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
data = b"".join(p.read_bytes() for p in parts)
record = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
record["state_dict"] = {k: v.float() if v.is_floating_point() else v for k, v in record["state_dict"].items()}
dst.parent.mkdir(parents=True, exist_ok=True)
torch.save(record, dst)
print(dst, "epoch", record["epoch"], "global_step", record["global_step"], sorted(k for k in record if k != "state_dict"))
