"""Whether bfloat16 pays off on the machine at hand.

bfloat16 autocast with channels-last inputs about halves the time of a CPU training step or forward pass where the
CPU computes bfloat16 natively (x86 with AVX-512 BF16 or AMX, Arm with the BF16 extension). Elsewhere it is
emulated: on an AVX2-only x86 CPU a compact CNN's training step took 11x, its forward pass 8x and a key Gram matrix
9x the float32 time (docs/development.md#bfloat16-on-the-cpu). The settings that default to bfloat16 (the trigger
estimation, the bench's scoring, the configs' ``trainer.precision: bf16-mixed``) therefore use it only where it is
native; the choice is recorded in ``environment.json`` (``native_bf16``).
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

#: Lightning precisions that compute in bfloat16 (mixed or throughout)
BF16_PRECISIONS = ("bf16-mixed", "bf16", "bf16-true")
#: Lightning precisions that run as ``bf16-mixed`` on a CPU (float16 autocast is not supported there)
CPU_AS_BF16 = ("16-mixed", "16")


@cache
def _cpuinfo(*keys: str) -> str:
    """The first value of any of ``keys`` in Linux's ``/proc/cpuinfo``; empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return ""


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (``flags`` on x86, ``Features`` on Arm); empty elsewhere."""
    return frozenset(_cpuinfo("flags", "Features").split())


def cpu_name() -> str:
    """The CPU's model name as Linux lists it (e.g. ``AMD EPYC 7B13``), else the platform's processor string: seconds
    measured on one CPU do not carry to another."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, an x86 CPU with AVX-512 BF16 or
    AMX tiles (as torch detects them), an Arm CPU with the BF16 extension (``bf16`` among its Linux features).
    Other devices and platforms: ``False``."""
    device = torch.device(device)
    if device.type == "cuda":  # emulated bfloat16 (e.g. on a V100 or T4) does not count
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return "bf16" in _cpu_flags()


def use_bf16(bf16: bool | None, device: torch.device | str = "cpu") -> bool:
    """``bf16`` as given, or for ``None`` (auto) whether ``device`` computes bfloat16 natively (:func:`native_bf16`)."""
    return native_bf16(device) if bf16 is None else bool(bf16)


def trainer_precision(precision: str | int | None, accelerator: str | None) -> str | int | None:
    """The Lightning precision to train with: ``precision``, except a bfloat16 one (:data:`BF16_PRECISIONS`, and
    ``16-mixed``, which Lightning runs as ``bf16-mixed`` on a CPU) on a CPU run (``accelerator`` ``cpu``, or
    ``auto``/``None`` with no CUDA device) whose CPU has no native bfloat16, which becomes ``"32-true"`` (emulated
    bfloat16 is several times slower, not faster)."""
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if str(precision) not in (*BF16_PRECISIONS, *(CPU_AS_BF16 if on_cpu else ())):
        return precision
    return "32-true" if on_cpu and not native_bf16("cpu") else precision
