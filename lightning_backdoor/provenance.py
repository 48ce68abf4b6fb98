"""The software stack a run used: bit-identical results hold for one stack and one thread count only, so every run
records them (``environment.json`` next to a fit's ``config.yaml``, the field ``environment`` of a defense report)."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lightning_backdoor.precision import cpu_name, native_bf16

#: Distributions whose versions change a run's numbers (timm only when installed).
PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "timm", "lightning-backdoor")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, ``None`` for one not installed; imports nothing."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(package: Path = Path(__file__).resolve().parent) -> dict[str, Any] | None:
    """``{"commit": <40 hex digits>, "dirty": <uncommitted changes to tracked files>}`` of the git checkout whose top
    folder holds ``package`` (by default this package's source: an editable install), or ``None`` when there is none
    or git is missing. An installed copy inside some other repository (a venv in a project) gives ``None``, not that
    repository's commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != package.resolve().parent:
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def environment() -> dict[str, Any]:
    """Python, package versions, this package's git commit, torch's intra-op thread count, the platform, the CPU's
    model name, whether it computes bfloat16 natively (:func:`~lightning_backdoor.precision.native_bf16`) and the
    accelerator (CUDA version and device name when one is visible) as a JSON-ready dict."""
    record: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                              # torch's own string keeps the build tag (+cpu, +cu130): the kernels differ
                              "packages": package_versions() | {"torch": torch.__version__}, "git": git_commit(),
                              "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                              "machine": platform.machine(), "cpu": cpu_name(), "native_bf16": native_bf16("cpu")}
    if torch.cuda.is_available():
        record["cuda"] = {"version": torch.version.cuda, "device": torch.cuda.get_device_name()}
    return record
