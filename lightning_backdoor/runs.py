"""Loading a run: its config files parsed as the CLI parses them, its weights read as plain tensors (no code runs)
after the checkpoint's stored settings are compared with the config; finding a run folder's checkpoint, and
recognising an already-trained run by the part of its config that decides its weights.

    from lightning_backdoor.runs import instantiate_run

    model, data = instantiate_run(["configs/quickstart.yaml"], "runs/quickstart/checkpoints/poisoned.ckpt")
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor, nn

from lightning_backdoor.backdoor_cli import BackdoorCLI, check_settings
from lightning_backdoor.classifier import PoisonedClassifier
from lightning_backdoor.data import PoisonedDataModule
from lightning_backdoor.io import load_state_dict, load_tensors
from lightning_backdoor.weights import load_weights

#: parts of a run's parsed ``trainer`` config that decide the trained weights (paths to logs and checkpoints do not)
TRAINER_KEYS = ("max_epochs", "max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val")
#: data module arguments that do not change the trained weights
DATA_KEYS_IGNORED = ("cache_dir", "num_workers", "eval_batch_size")


def config_arguments(configs: list[str | Path], overrides: list[str] | None = None) -> list[str]:
    """Command-line arguments that parse ``configs`` (in order, later ones win) with no logger, then ``overrides``
    (``--key=value`` flags)."""
    return [arg for config in configs for arg in ("--config", str(config))] + ["--trainer.logger=false",
                                                                               *(overrides or [])]


def read_weights(checkpoint: str | Path, model: nn.Module, datamodule: Any) -> dict[str, Tensor]:
    """The model weights in ``checkpoint`` (a Lightning checkpoint, a state_dict file or ``.safetensors``), loaded
    as plain tensors; a Lightning checkpoint's stored data settings and model hyperparameters are first compared
    with ``model`` and ``datamodule``. Nothing is loaded into ``model``.

    Raises:
        ValueError: (one line) no such file, a file that is not plain tensors (loading it would run code) or holds
            no state_dict, or a checkpoint trained with other settings (the first differing one is named).
    """
    checkpoint = Path(checkpoint)
    state_dict = load_state_dict(checkpoint)
    if checkpoint.suffix != ".safetensors":  # a Lightning checkpoint also holds the settings it was trained with
        record = load_tensors(checkpoint)
        if isinstance(record, dict) and isinstance(record.get("state_dict"), dict):
            check_settings(record, model, datamodule, checkpoint)
    return state_dict


def instantiate_run(configs: list[str | Path], checkpoint: str | Path, overrides: list[str] | None = None
                    ) -> tuple[PoisonedClassifier, PoisonedDataModule]:
    """A run's model, holding ``checkpoint``'s weights, and its data module, from the run's config files.

    Args:
        configs: the CLI config files of the run, in the order ``fit`` got them, or the ``config.yaml`` that
            ``fit`` saved in the run's folder.
        checkpoint: the weights: a Lightning checkpoint (its settings are checked), a state_dict file or
            ``.safetensors``; loaded without running code, key layouts mapped as ``defend`` maps them.
        overrides: ``--key=value`` flags applied after the configs, as on the command line.

    Returns:
        The model (in training mode, as instantiated) and the data module (not yet set up).

    Raises:
        ValueError: (one line) as :func:`read_weights`, or weights that do not fit the model.
        SystemExit: a config that does not parse (jsonargparse prints its usage and reason first).
    """
    cli = BackdoorCLI(args=config_arguments(configs, overrides), run=False, parser_kwargs={"parser_mode": "omegaconf"},
                      save_config_callback=None)
    load_weights(cli.model, read_weights(checkpoint, cli.model, cli.datamodule))
    return cli.model, cli.datamodule


class _ParseOnly(BackdoorCLI):
    """The CLI's parsing without instantiating the model, the data module or the Trainer."""

    def instantiate_classes(self) -> None:
        """Parsing is all a training config needs."""


def training_config(configs: list[str | Path], overrides: list[str]) -> dict[str, Any]:
    """The parsed config parts that decide a poisoned model's weights: ``seed_everything``, ``model``, ``data``
    (without :data:`DATA_KEYS_IGNORED`) and the ``trainer``'s :data:`TRAINER_KEYS`, as plain values.

    Raises:
        SystemExit: a config that does not parse (jsonargparse prints its usage and reason first).
    """
    cli = _ParseOnly(args=config_arguments(configs, overrides), run=False, parser_kwargs={"parser_mode": "omegaconf"},
                     save_config_callback=None)
    config = cli.config.as_dict()
    data = copy.deepcopy(config["data"])
    for key in DATA_KEYS_IGNORED:
        data.get("init_args", {}).pop(key, None)
    return {"seed_everything": config.get("seed_everything"), "model": config["model"], "data": data,
            "trainer": {key: config["trainer"].get(key) for key in TRAINER_KEYS}}


def config_key(config: dict[str, Any]) -> str:
    """A short stable hash (12 hex digits) of a :func:`training_config`: equal keys, equally trained weights."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=_stable_text).encode()).hexdigest()[:12]


def _stable_text(value: Any) -> str:
    """A value's text for hashing, without what changes between processes: a function or class by its import
    path (its default ``repr`` holds a memory address)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return str(value)


def run_checkpoint(run_dir: Path) -> Path | None:
    """A run folder's poisoned checkpoint: ``checkpoints/poisoned.ckpt``, else its newest ``.ckpt``; ``None`` if it
    has none."""
    preferred = run_dir / "checkpoints" / "poisoned.ckpt"
    if preferred.is_file():
        return preferred
    found = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def saved_run_key(run_dir: Path) -> str:
    """The :func:`config_key` of a finished run, from its saved ``config.yaml`` minus the fit-only keys (so it parses
    like the configs that made it); the run folder is only read.

    Raises:
        SystemExit, ValueError, KeyError: the saved config is not one of this project's (another tool's folder,
            an older layout).
    """
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key in ("ckpt_path", "weights_only"):
        saved.pop(key, None)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(saved))
        return config_key(training_config([path], []))


def find_existing_run(key: str, search_runs: list[str]) -> Path | None:
    """A run folder directly under one of the ``search_runs`` folders, holding a checkpoint and a saved config whose
    :func:`saved_run_key` is ``key``; ``None`` if there is none. Folders whose config does not parse are skipped."""
    for root in search_runs:
        for config in sorted(Path(root).glob("*/config.yaml")):
            run_dir = config.parent
            if run_checkpoint(run_dir) is None:
                continue
            try:
                found = saved_run_key(run_dir)
            except (ValueError, SystemExit, KeyError):  # a folder of another project or an older layout
                continue
            if found == key:
                return run_dir
    return None
