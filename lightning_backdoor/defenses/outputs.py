"""Write a defense report's files: the defended weights, the report, its bar chart and the estimated trigger."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lightning_backdoor.defenses.report import DefenseReport
from lightning_backdoor.defenses.report_plot import save_report_plot
from lightning_backdoor.io import atomic_json, atomic_save, atomic_write

REPORT_NAME = "defense_report.json"


def unique_path(path: Path) -> Path:
    """``path`` if free, else ``stem-v1.suffix``, ``stem-v2.suffix``...: outputs never overwrite a file."""
    candidate, version = path, 0
    while candidate.exists():
        version += 1
        candidate = path.with_name(f"{path.stem}-v{version}{path.suffix}")
    return candidate



def save_image(image: Tensor, path: str | Path, scale: int = 8) -> None:
    """Save an image (C, H, W) in [0, 1] as PNG (atomically, creating its folder), enlarged ``scale`` times (nearest
    neighbour) to be visible."""
    from PIL import Image

    pixels = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0)
    array = pixels.squeeze(-1).numpy() if pixels.shape[-1] == 1 else pixels.numpy()
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def write_outputs(report: DefenseReport, state_dict: dict[str, Tensor], output_dir: str | Path) -> Path:
    """Write a report's files, each atomically and under a fresh name: the defended weights (a code-free
    Lightning-style checkpoint and safetensors), the estimated trigger's picture (when the defense estimated one),
    the bar chart (``defense_report.png``) and the report itself; record them in ``report.files`` and return the
    report's path."""
    import lightning
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    checkpoint_path = unique_path(output_dir / "defended.ckpt")
    state = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    checkpoint = {"state_dict": state, "pytorch-lightning_version": lightning.__version__,
                  "epoch": 0, "global_step": 0}
    atomic_save(checkpoint, checkpoint_path)
    safetensors_path = checkpoint_path.with_suffix(".safetensors")
    atomic_write(safetensors_path, lambda tmp: save_file(state, tmp))
    report.files |= {"checkpoint": checkpoint_path, "safetensors": safetensors_path}
    if report.result.picture is not None:  # the trigger unknown: show what was estimated
        report.files["estimated_trigger"] = unique_path(output_dir / "estimated_trigger.png")
        save_image(report.result.picture, report.files["estimated_trigger"])
    report_path = unique_path(output_dir / REPORT_NAME)
    report.files["plot"] = unique_path(report_path.with_suffix(".png"))
    atomic_write(report.files["plot"], lambda tmp: save_report_plot(report.to_json(), tmp))
    report.files["report"] = atomic_json(report.to_json(), report_path)
    return report.files["report"]
