"""The ``lightning-backdoor`` command: LightningCLI's fit/validate/test/predict, plus ``defend``."""

from __future__ import annotations

import pickle
import sys
import tempfile
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins import LayerSync
from torch import Tensor, nn

from lightning_backdoor.classifier import PoisonedClassifier
from lightning_backdoor.dashboard import choose_mode
from lightning_backdoor.data import PoisonedDataModule
from lightning_backdoor.defenses import Defense
from lightning_backdoor.io import first_line, load_state_dict, load_tensors
from lightning_backdoor.models.sync_batchnorm import SyncBatchNormPlugin
from lightning_backdoor.weights import load_weights

#: jsonargparse raises instead of printing usage and exiting, so ``main`` can print its error on one line.
PARSER_KWARGS = {"parser_mode": "omegaconf", "exit_on_error": False, "allow_abbrev": False}
#: ``--ckpt_path`` values that Lightning resolves itself (to the run's own checkpoints).
LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")
#: model arguments the data module sets at instantiation (the config holds placeholders until then).
LINKED_MODEL_ARGS = ("num_classes", "in_channels", "target_class")


class BackdoorCLI(LightningCLI):
    """LightningCLI with the data module's classes, channels and target linked into the model."""

    def __init__(self, *args: object, defend: bool = False, **kwargs: object) -> None:
        self.defend_mode = defend
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.target_class", "model.init_args.target_class")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")
        if self.defend_mode:
            parser.add_argument("--checkpoint", type=str, required=True,
                                help="model weights: a Lightning checkpoint, a state_dict file or .safetensors")
            parser.add_subclass_arguments(Defense, "defense", required=False,
                                          default={"class_path": "lightning_backdoor.defenses.ActivationEditing"},
                                          help="the defense to run (default: the config's DefenseCallback "
                                               "defense, else activation editing with repair)")
            parser.add_argument("--unseen_per_class", type=int | None, default=None,
                                help="use the first k unseen images per class (default: as the config's "
                                     "DefenseCallback, else all)")
            parser.add_argument("--trigger_known", type=bool, default=True,
                                help="false: estimate the trigger and target from the model and the unseen split "
                                     "(the data's trigger then only serves the evaluation)")
            parser.add_argument("--output_dir", type=str | None, default=None,
                                help="where the report and defended weights go (default: the checkpoint's run)")

    def before_instantiate_classes(self) -> None:
        """Keep a run in one folder: checkpoints, logs and the W&B run go under ``trainer.default_root_dir``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.default_root_dir or ".")
        if self.subcommand == "fit" and (root / "config.yaml").exists():
            raise ValueError(f"{root} already holds a run; choose a new --trainer.default_root_dir (nothing is "
                             f"overwritten)")
        if self.subcommand == "fit":
            check_writable(root, "run folder")
        else:  # validate/test/predict often run in the fit's folder: its config.yaml is the fit's, keep it
            self.save_config_callback = None
        if config.get("weights_only") is False:
            raise ValueError("--weights_only=false would let a checkpoint run code when it loads; this tool loads "
                             "weights only")
        for callback in config.trainer.callbacks or []:
            if callback.class_path.endswith("ModelCheckpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(root / "checkpoints")
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        for logger in loggers:
            if getattr(logger, "class_path", "").endswith("WandbLogger") and logger.init_args.get("save_dir") in (None, "."):
                logger.init_args.save_dir = str(root)
            if getattr(logger, "class_path", "").endswith("WandbLogger"):
                choose_mode(logger.init_args, root)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer; ``sync_batchnorm`` uses :class:`SyncBatchNormPlugin`, which also syncs on CPU."""
        config = self._get(self.config_init, "trainer", default={})
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if config.get("sync_batchnorm") and not any(isinstance(plugin, LayerSync) for plugin in plugins):
            kwargs["plugins"] = [*plugins, SyncBatchNormPlugin()]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` instead of merging its hyperparameters into the config as Lightning does.

        The file must load as plain tensors (no code runs), and its hyperparameters must agree with the config:
        they are compared, never parsed, because jsonargparse imports any ``class_path`` it finds in them (a
        checkpoint could name any installed module). The config stays the only source of the run's settings.
        """
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path == "last":  # the file Lightning will resume from: the run's newest *last*.ckpt, checked alike
            found = Path(config.trainer.default_root_dir or ".", "checkpoints").glob("*last*.ckpt")
            ckpt_path = max(found, key=lambda path: path.stat().st_mtime, default=None)
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_NAMES or str(ckpt_path).startswith("registry:"):
            return
        checkpoint = load_tensors(ckpt_path)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise ValueError(f"{ckpt_path} is not a Lightning checkpoint (no state_dict); use `defend --checkpoint` "
                             f"for bare weights")
        hparams = checkpoint.get("hyper_parameters")
        hparams = hparams if isinstance(hparams, dict) else {}
        if "_class_path" in hparams and hparams["_class_path"] != config.model.class_path:
            raise ValueError(f"{ckpt_path} holds model class {str(hparams['_class_path'])[:100]!r}, not the config's "
                             f"{config.model.class_path!r}; pass the run's config")
        init_args = config.model.get("init_args") or {}
        for key, value in hparams.items():
            if key in LINKED_MODEL_ARGS or key.startswith("_") or key not in init_args:
                continue
            if _plain(init_args[key]) != value:
                raise ValueError(f"{ckpt_path} was trained with model {key}={str(value)[:100]} but the config says "
                                 f"{_plain(init_args[key])}; pass the run's config")

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning's keyword arguments, with checkpoints always loaded as weights only (``last``/``best`` too)."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            kwargs["weights_only"] = True
        return kwargs


def _plain(value: Any) -> Any:
    """A config value as the plain dicts, lists and scalars a checkpoint's hyperparameters hold."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def check_writable(folder: Path, what: str) -> None:
    """Raise a one-line ``ValueError`` unless ``folder`` is, or can be created as, a writable folder."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {folder} cannot be created: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):  # an unnamed file: probes permissions without leaving a trace
            pass
    except OSError as error:
        raise ValueError(f"{what} {folder} is not writable ({error.strerror}); choose a writable folder") from None


def instantiate_run(configs: list[str], checkpoint: str | Path, overrides: list[str] | None = None
                    ) -> tuple[PoisonedClassifier, PoisonedDataModule]:
    """The model (with the checkpoint's weights, loaded without running code) and data module of a run's configs."""
    args = [arg for config in configs for arg in ("--config", config)] + ["--trainer.logger=false", *(overrides or [])]
    cli = BackdoorCLI(PoisonedClassifier, PoisonedDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      parser_kwargs={"parser_mode": "omegaconf"}, args=args, run=False,
                      auto_configure_optimizers=False, save_config_callback=None)
    load_weights(cli.model, load_state_dict(checkpoint))
    return cli.model, cli.datamodule


def run_defend(args: list[str]) -> None:
    """``lightning-backdoor defend``: load weights without running code, defend, write report and weights."""
    from lightning_backdoor.defenses.callback import DefenseCallback

    cli = BackdoorCLI(PoisonedClassifier, PoisonedDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      parser_kwargs=PARSER_KWARGS, args=args, run=False, defend=True,
                      auto_configure_optimizers=False, save_config_callback=None)
    config = cli.config
    checkpoint = Path(config.checkpoint)
    output_dir = Path(config.output_dir) if config.output_dir else (
        checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent)
    state_dict = load_state_dict(checkpoint)
    load_weights(cli.model, state_dict)
    check_writable(output_dir, "output folder")  # created only when the outputs are written
    configured = next((c for c in cli.trainer.callbacks if isinstance(c, DefenseCallback)), None)
    if configured is None or any(arg.startswith("--defense") for arg in args):
        defense, unseen_per_class = cli.config_init.defense, config.unseen_per_class
    else:  # the run's own fit-end defense, so that `defend` repeats what `fit` did
        defense = configured.defense
        unseen_per_class = (config.unseen_per_class if config.unseen_per_class is not None
                            else configured.unseen_per_class)
    callback = DefenseCallback(defense=defense, unseen_per_class=unseen_per_class, trigger_known=config.trigger_known)
    callback.defend(cli.model, cli.datamodule, [], output_dir)
    print(f"defended weights: {callback.checkpoint_path}")
    print(f"defense report: {callback.report_path}")


def main(args: list[str] | None = None) -> None:
    """Entry point of the console script."""
    argv = sys.argv[1:] if args is None else args
    torch.set_float32_matmul_precision("high")
    try:
        if argv and argv[0] == "defend":
            run_defend(argv[1:])
            return
        if argv and argv[0] == "bench":
            from lightning_backdoor.bench import run_bench

            run_bench(argv[1:])
            return
        BackdoorCLI(PoisonedClassifier, PoisonedDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    parser_kwargs=PARSER_KWARGS, args=args, auto_configure_optimizers=False)
    except (ValueError, ArgumentError, pickle.UnpicklingError) as error:
        print(f"lightning-backdoor: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(error: BaseException) -> str:
    """Our own message inside jsonargparse's multi-line wrapping (it lists each union member's error)."""
    if isinstance(error, ArgumentError):
        return parser_error_line(str(error))
    if isinstance(error, pickle.UnpicklingError):  # Lightning's own weights-only load (`--ckpt_path best`/`hpc`)
        return f"refusing to load the checkpoint: not a plain tensor file ({first_line(error)})"
    chain = [error]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for cause in reversed(chain):
        if isinstance(cause, ValueError) and str(cause) and "\n" not in str(cause).strip():
            return str(cause).strip()
    lines = str(error).strip().splitlines()
    reasons = [line.strip()[2:] for line in lines if line.strip().startswith("- ") and "Expected a" not in line]
    return reasons[0] if reasons else lines[0]


_PARSER_NOISE = ("Parser key", "Does not validate against", "Subtypes:", "Errors:", "Given value",
                 "Expected a <class 'NoneType'>", "Problem with given class_path")


def parser_error_line(message: str) -> str:
    """One line from jsonargparse's nested report: the keys leading to the innermost reason, e.g.
    ``data.trigger.size: expected int, got 'abc'`` or ``data.trigger: class_path 'x.Y': No module named 'x'``."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    if not any(line.strip(" -").startswith('Parser key "') for line in lines):  # e.g. YAML syntax: one sentence
        return " ".join(line.strip() for line in lines)
    def depth(line: str) -> int:
        return len(line) - len(line.lstrip(" -"))
    reasons = [i for i, line in enumerate(lines) if not line.strip(" -").startswith(_PARSER_NOISE)]
    if not reasons:
        return lines[0].strip()
    index = max(reasons, key=lambda i: (depth(lines[i]), i))
    reason = lines[index].strip(" -").replace("Expected a <class '", "expected ").replace("'>", "")
    previous = lines[index - 1].strip(" -") if index else ""
    if previous.startswith("Problem with given class_path"):
        reason = f"{previous.removeprefix('Problem with given ').rstrip(':')}: {reason}"
    keys = [line.strip(" -").split('"')[1] for line in lines[:index] if line.strip(" -").startswith('Parser key "')]
    given = [line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("Given value:")]
    if "Got value" not in reason and given and not given[-1].startswith("NestedArg") and given[-1] not in reason:
        reason += f", got {given[-1]!r}"
    return f"{'.'.join(keys)}: {reason}" if keys else reason


if __name__ == "__main__":
    main()
