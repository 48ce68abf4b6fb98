"""Rebuild the ImageFolder tree (same file names, same bytes) from <folder>/cifar10.bin + cifar10.idx (pack_data.py).

    python unpack_data.py <folder> <out>
"""
import sys
from pathlib import Path

here, out = Path(sys.argv[1]), Path(sys.argv[2])
with open(here / "cifar10.bin", "rb") as blob:
    for line in open(here / "cifar10.idx"):
        rel, size = line.rstrip("\n").split("\t")
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob.read(int(size)))
print("unpacked", out)
