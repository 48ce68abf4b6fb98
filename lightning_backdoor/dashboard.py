"""Weights & Biases dashboards: offline unless online can work, sample images and the trigger at fit start, and the
defense's before/after table, bar chart, per-class accuracy, report plot and artifacts.

Everything here is a no-op for loggers other than ``WandbLogger``, so callers stay logger-agnostic.
"""

from __future__ import annotations

import netrc
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_backdoor.defenses.report import EXTRA_METRICS, METRIC_TITLES, STAGE_TITLES, DefenseReport
from lightning_backdoor.evaluation import METRIC_NAMES
from lightning_backdoor.triggers import Trigger

STAGES = tuple(STAGE_TITLES)
DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_SECONDS = 3.0
INIT_TIMEOUT_SECONDS = "30"


def wandb_loggers(loggers: Iterable[Any]) -> list[WandbLogger]:
    """The W&B loggers among ``loggers``."""
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


# --- online or offline -------------------------------------------------------------------------------------------

def has_credentials(base_url: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether W&B could log in without asking: ``WANDB_API_KEY``, an identity token, or a ``.netrc`` entry."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(base_url).netloc)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def reachable(base_url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether the W&B server answers an HTTP request (any status, through the proxy settings) within ``timeout``
    seconds: a server that accepts connections but never replies counts as unreachable."""
    try:
        with urllib.request.urlopen(base_url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, timeouts, resets; ValueError: a malformed URL
        return False


def offline_reason(offline: bool, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why a W&B run must be offline, or ``None`` when online can work. Never prompts for a login and never waits
    on the network longer than ``PROBE_SECONDS``."""
    mode = environ.get("WANDB_MODE", "")
    if offline:
        return "offline in the logger settings"
    if mode in ("offline", "dryrun"):
        return f"WANDB_MODE={mode}"
    if mode == "disabled":
        return None
    base_url = environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
    if not has_credentials(base_url, environ):
        return "no W&B login: set WANDB_API_KEY or run `wandb login` to go online"
    if not reachable(base_url):
        return f"W&B server {urlsplit(base_url).netloc} unreachable"
    return None


def choose_mode(init_args: Any, root: Path) -> str | None:
    """Set a ``WandbLogger`` config's ``offline`` flag (in place); when the run is offline, print and return one
    line saying why and how to upload it.

    Online runs get ``WANDB_INIT_TIMEOUT`` (30 s unless set) so a server that stops answering after the probe
    fails the run instead of hanging it. ``WANDB_MODE=disabled`` wins over a config's ``offline: true`` (which
    Lightning's logger would otherwise turn into an offline run written to disk): nothing is logged or written.
    """
    if os.environ.get("WANDB_MODE") == "disabled":
        init_args.offline = False  # wandb.init then reads the environment's mode
        line = "W&B: disabled (WANDB_MODE=disabled): nothing is logged or written"
        rank_zero_info(line)
        return line
    reason = offline_reason(bool(init_args.get("offline", False)))
    if reason is None:
        os.environ.setdefault("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_SECONDS)
        return None
    init_args.offline = True
    save_dir = Path(init_args.get("save_dir") or root)
    line = f"W&B: offline run ({reason}); upload it with `wandb sync {save_dir / 'wandb' / 'latest-run'}`"
    rank_zero_info(line)
    return line


# --- images ------------------------------------------------------------------------------------------------------

def to_picture(image: Tensor, min_size: int = 96) -> Any:
    """A ``(C, H, W)`` image, uint8 or float in [0, 1], as an ``(H, W)`` or ``(H, W, 3)`` uint8 array, enlarged by
    an integer factor (nearest neighbour) to at least ``min_size`` pixels so small digits stay visible."""
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    scale = max(1, -(-min_size // image.shape[-1]))
    image = image.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    picture = image.permute(1, 2, 0).cpu().numpy()
    return picture[..., 0] if picture.shape[-1] == 1 else picture


def trigger_views(trigger: Trigger, images: Tensor) -> dict[str, Tensor]:
    """Pictures of a trigger, each ``(C, H, W)`` in [0, 1]: stamped on a mid-grey image, and its mean absolute
    change to ``images`` (N, C, H, W, float in [0, 1]) scaled to full range (the only view of a warping trigger)."""
    grey = trigger(torch.full_like(images[:1], 0.5))[0]
    change = (trigger(images) - images).abs().mean(dim=0)
    return {"on_grey": grey, "change": change / change.max().clamp_min(1e-8)}


def sample_pairs(datamodule: Any, count: int) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """The first ``count`` test images the attack targets: clean and triggered, uint8 (K, C, H, W) with K <= count,
    with captions. Only those K samples are read (``test_samples``): chosen from the labels, so a streaming data
    module decodes K files, not its test split."""
    attack = datamodule.attack_labels(datamodule.test_set.labels)
    chosen = torch.nonzero(attack >= 0).flatten()[:count]
    images, labels, triggered, attack = datamodule.test_samples(chosen)
    classes, pairs = datamodule.classes, list(zip(labels.tolist(), attack.tolist()))
    clean_captions = [str(classes[label]) for label, _ in pairs]
    triggered_captions = [f"{classes[label]} → {classes[target]}" for label, target in pairs]
    return images, triggered, clean_captions, triggered_captions


class WandbSamples(L.Callback):
    """At fit start, log clean and triggered test images and the trigger to every ``WandbLogger``.

    Needs a data module with ``trigger`` and ``test_samples()`` (``PoisonedDataModule``); does nothing otherwise.

    Args:
        num_images: how many clean/triggered pairs to show.
    """

    def __init__(self, num_images: int = 16) -> None:
        self.num_images = num_images

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = wandb_loggers(trainer.loggers)
        datamodule = getattr(trainer, "datamodule", None)
        if not (trainer.is_global_zero and loggers and hasattr(datamodule, "test_samples")):
            return
        log_samples(loggers, datamodule, self.num_images)


def log_samples(loggers: list[WandbLogger], datamodule: Any, num_images: int) -> None:
    """Log ``num_images`` clean/triggered pairs and the data module's trigger to W&B."""
    clean, triggered, clean_captions, triggered_captions = sample_pairs(datamodule, num_images)
    views = trigger_views(datamodule.trigger, clean.float() / 255)
    for logger in loggers:
        logger.log_image("samples/clean", [to_picture(image) for image in clean], caption=clean_captions)
        logger.log_image("samples/triggered", [to_picture(image) for image in triggered], caption=triggered_captions)
        logger.log_image("trigger", [to_picture(view) for view in views.values()],
                         caption=[f"{datamodule.trigger!r}: {name.replace('_', ' ')}" for name in views])


# --- the defense report ------------------------------------------------------------------------------------------

def summary_metrics(report: Mapping[str, Any]) -> tuple[str, ...]:
    """``METRIC_NAMES``, plus those of ``EXTRA_METRICS`` the report holds (the mirrored trigger's ASR; the estimated
    trigger's success when the trigger was unknown and the true ASR not measurable)."""
    extras = [name for name in EXTRA_METRICS if any(name in report[stage] for stage in STAGES if stage in report)]
    return (*METRIC_NAMES, *extras)


def summary_rows(report: Mapping[str, Any]) -> list[list[Any]]:
    """One row per stage: the stage, then each metric of :func:`summary_metrics` in % (``None`` where not
    measured)."""
    def percent(value: Any) -> float | None:
        return round(100 * value, 2) if isinstance(value, float) else None

    return [[STAGE_TITLES[stage]] + [percent(report[stage].get(name)) for name in summary_metrics(report)]
            for stage in STAGES if stage in report]


def defense_tables(report: Mapping[str, Any], class_names: list[str] | None = None) -> dict[str, Any]:
    """``defense/summary`` (CA, ASR, ASR floor, RA, TA, and the mirrored and estimated triggers' ASR when measured,
    in % per stage), ``defense/chart`` (the same as bars) and ``defense/per_class_acc`` (per-class accuracy in % per
    stage), as W&B objects."""
    import wandb

    columns = ["stage"] + [METRIC_TITLES[name] for name in summary_metrics(report)]
    rows = summary_rows(report)
    bars = wandb.Table(columns=["bar", "percent"],
                       data=[[f"{column} {row[0]}", value] for row in rows
                             for column, value in zip(columns[1:], row[1:]) if value is not None])
    stages = [stage for stage in STAGES if stage in report]
    num_classes = len(report[stages[0]].get("per_class_acc", []))
    names = class_names or [str(index) for index in range(num_classes)]
    per_class = [[names[index]] + [round(100 * report[stage]["per_class_acc"][index], 2) for stage in stages]
                 for index in range(num_classes)]
    return {"defense/summary": wandb.Table(columns=columns, data=rows),
            "defense/chart": wandb.plot.bar(bars, "bar", "percent", title="defense: CA, ASR, RA, TA in %"),
            "defense/per_class_acc": wandb.Table(columns=["class"] + [STAGE_TITLES[s] for s in stages],
                                                 data=per_class)}


def defense_artifacts(report: DefenseReport, run_id: str) -> list[Any]:
    """Two W&B artifacts: ``defense-report-<run>`` (the report and its PNGs) and ``defended-model-<run>`` (the
    defended weights), the latter only when weights were written."""
    import wandb

    files = {key: path for key, path in report.files.items() if Path(path).is_file()}
    result = report.result
    report_artifact = wandb.Artifact(f"defense-report-{run_id}", type="defense_report", metadata={
        "der": report.der, "method": result.method, "layer": result.layer})
    for path in files.values():
        if path.suffix in (".json", ".png"):
            report_artifact.add_file(str(path))
    weights = [path for path in files.values() if path.suffix in (".safetensors", ".ckpt")]
    if not weights:
        return [report_artifact]
    model_artifact = wandb.Artifact(f"defended-model-{run_id}", type="model", metadata={"layer": result.layer})
    for path in weights:
        model_artifact.add_file(str(path))
    return [report_artifact, model_artifact]


def log_defense(loggers: Iterable[Any], report: DefenseReport, class_names: list[str] | None = None) -> None:
    """Log a defense report to every ``WandbLogger``: the before/after table and bar chart, per-class accuracy, the
    PNGs it wrote, and its artifacts (see :func:`defense_tables`, :func:`defense_artifacts`)."""
    loggers = wandb_loggers(loggers)
    if not loggers:
        return
    import wandb

    images = {key: path for key, path in report.files.items() if path.suffix == ".png" and path.is_file()}
    runs = [run for run in (logger.experiment for logger in loggers) if not getattr(run, "disabled", False)]
    if not runs:  # WANDB_MODE=disabled: nothing to log to, and nothing to claim
        return
    for run in runs:
        run.log(defense_tables(report.to_json(), class_names) | {f"defense/{key}": wandb.Image(str(path))
                                                                  for key, path in images.items()})
        for artifact in defense_artifacts(report, getattr(run, "id", None) or "run"):
            run.log_artifact(artifact)
    rank_zero_info(f"defense: logged the report, its tables, {len(images)} image(s) and artifacts to W&B")


class WandbDefenseReport(L.Callback):
    """Logs the report of a :class:`~lightning_backdoor.defenses.callback.DefenseCallback` in the same Trainer to
    every ``WandbLogger`` (:func:`log_defense`) when the defense ends; add it beside the defense callback."""

    def on_defense_end(self, trainer: L.Trainer, pl_module: L.LightningModule, report: DefenseReport) -> None:
        """Called by the defense callback on rank 0 once the report's files are written."""
        datamodule = getattr(trainer, "datamodule", None)
        log_defense(trainer.loggers, report, list(getattr(datamodule, "classes", [])) or None)
