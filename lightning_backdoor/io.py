"""Safe file I/O: atomic writes, and loading that never unpickles code (users defend models they did not train)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def atomic_write(path: str | Path, write: Any) -> Path:
    """Call ``write(tmp_path)``, then put the result at ``path`` in one step: ``path``'s folder never holds a
    partial or temporary file, even when the process is killed (SIGKILL included).

    ``tmp_path`` is in a private folder under the system's temp folder and ends with ``path``'s name (writers that
    pick a format from the suffix work). Its bytes are then copied into an unnamed file in ``path``'s folder
    (Linux ``O_TMPFILE``: the kernel frees it if we die) and linked into place. Without ``O_TMPFILE`` a named
    temporary file and a rename are used, which a kill can leave behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lightning-backdoor-") as private:
        tmp = os.path.join(private, path.name)
        write(tmp)
        try:
            fd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o644)
        except (AttributeError, OSError):
            _publish_by_rename(tmp, path)
        else:
            try:
                _copy_into(tmp, fd)
                _link(fd, path)
            finally:
                os.close(fd)
    return path


def _copy_into(source: str, fd: int) -> None:
    """Copy a file's bytes into the open descriptor ``fd`` and flush them to disk."""
    with open(source, "rb") as reader, os.fdopen(fd, "wb", closefd=False) as writer:
        shutil.copyfileobj(reader, writer, 1 << 20)
        writer.flush()
        os.fsync(fd)


def _link(fd: int, path: Path) -> None:
    """Give the unnamed file ``fd`` the name ``path`` (replacing an existing file through a hidden name)."""
    unnamed = f"/proc/self/fd/{fd}"
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:  # a dir_fd makes Python call linkat(..., AT_SYMLINK_FOLLOW), which resolves the /proc link
        try:
            os.link(unnamed, path.name, dst_dir_fd=folder, follow_symlinks=True)
        except FileExistsError:
            staged = f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            os.link(unnamed, staged, dst_dir_fd=folder, follow_symlinks=True)
            os.replace(staged, path.name, src_dir_fd=folder, dst_dir_fd=folder)
    finally:
        os.close(folder)


def _publish_by_rename(source: str, path: Path) -> None:
    """The portable fallback: copy to a hidden temporary file next to ``path``, then rename it onto ``path``."""
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _copy_into(source, fd)
        os.close(fd)
        fd = -1
        os.replace(staged, path)
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(staged):
            os.remove(staged)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by its text (``"inf"``, ``"-inf"``, ``"nan"``; ``float()`` reads
    them back), so that the JSON written is valid for every parser: Python's ``json`` writes ``Infinity``, which
    strict parsers (JavaScript's, jq's, most databases') refuse. Dicts, lists and tuples are walked."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {key: strict_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(value) for value in obj]
    return obj


def atomic_json(obj: Any, path: str | Path) -> Path:
    """Write JSON atomically, indented; non-finite floats as text (:func:`strict_json`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(strict_json(obj), handle, indent=2, allow_nan=False)
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
        raise ValueError(f"refusing to load {path}: not a plain tensor file ({first_line(error)})") from None


def first_line(error: BaseException) -> str:
    """The telling line of an error's message (torch's unpickler reason if present, else the first; at most 200
    characters, terminal colour codes removed), or its type's name when it has none."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    for index, line in enumerate(lines):  # torch's unpickler gives its reason after this, or on the next line
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip() or next(iter(lines[index + 1:]), "")
            if reason.startswith("Unsupported operand"):  # the first byte is no pickle opcode: e.g. a text file
                return f"not written by torch.save: {reason}"
            return f"WeightsUnpickler error: {reason}".split(" Please use")[0][:200]
    reasons = [line for line in lines if "Unsupported global" in line]
    return (reasons or lines)[0].split(" Please use")[0][:200]  # not torch's advice on how to load it anyway


#: Keys under which checkpoints nest their weights (Lightning's first), e.g. ``{"epoch": 3, "model_state_dict": ...}``.
NESTED_WEIGHTS_KEYS = ("state_dict", "model_state_dict", "model", "net")


def check_weights_file(path: str | Path) -> Path:
    """``path`` as a Path when it names a file.

    Raises:
        ValueError: (one line) it is a folder or does not exist.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; pass the weights file inside it")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    return path


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Model weights from a Lightning checkpoint, a state_dict file (possibly nested under one of
    ``NESTED_WEIGHTS_KEYS``) or safetensors, without running code."""
    path = check_weights_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # SafetensorError, or OSError for a file that is not safetensors at all
            raise ValueError(f"refusing to load {path}: not a valid safetensors file ({first_line(error)})") from None
    loaded = load_tensors(path)
    for _ in range(4):  # a few levels, never forever: a crafted file can hold a dict inside itself
        if not isinstance(loaded, dict) or all(isinstance(value, Tensor) for value in loaded.values()):
            break
        key = next((key for key in NESTED_WEIGHTS_KEYS if isinstance(loaded.get(key), dict)), None)
        if key is None:
            break
        loaded = loaded[key]
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
