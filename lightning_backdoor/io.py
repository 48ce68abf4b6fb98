"""Safe file I/O: atomic writes, and loading that never unpickles code (users defend models they did not train)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def atomic_write(path: str | Path, write: Any) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_json(obj: Any, path: str | Path) -> Path:
    """Write JSON atomically, indented."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(obj, handle, indent=2)
            handle.write("\n")
    return atomic_write(path, write)


def load_tensors(path: str | Path) -> Any:
    """Load a torch file holding tensors and plain containers only (``weights_only=True``: no code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a file") from None
    except Exception as error:  # torch raises UnpicklingError and others for crafted or foreign files
        raise ValueError(f"refusing to load {path}: not a plain tensor file ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    """The telling line of an error's message (torch's unpickler reason if present, else the first; at most 200
    characters, terminal colour codes removed), or its type's name when it has none."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    reasons = [line for line in lines if "Unsupported global" in line or "WeightsUnpickler error" in line]
    return (reasons or lines)[0].split(" Please use")[0][:200]  # not torch's advice on how to load it anyway


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Model weights from a Lightning checkpoint, a state_dict file or safetensors, without running code."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; pass the weights file inside it")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # SafetensorError, or OSError for a file that is not safetensors at all
            raise ValueError(f"refusing to load {path}: not a valid safetensors file ({_first_line(error)})") from None
    loaded = load_tensors(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{path} holds no state_dict (expected a mapping of names to tensors)")
    return loaded


def state_digest(state_dict: dict[str, Tensor]) -> str:
    """SHA-256 (hex) of a state_dict's names, dtypes, shapes and bytes: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
