"""Pack an ImageFolder tree (CIFAR-10's 60,000 small JPEGs) into one blob and an index, for a machine that takes a
few large files rather than many small ones; unpack_data.py rebuilds it byte for byte.

    python pack_data.py ../shared/data/cifar10 .gpu
"""
import sys
from pathlib import Path

root, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
files = sorted(p for p in root.rglob("*") if p.is_file())
with open(out / "cifar10.bin", "wb") as blob, open(out / "cifar10.idx", "w") as index:
    for path in files:
        data = path.read_bytes()
        blob.write(data)
        index.write(f"{path.relative_to(root)}\t{len(data)}\n")
print(f"packed {len(files)} files into {out / 'cifar10.bin'}")
