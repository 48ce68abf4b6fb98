"""The ``lightning-backdoor`` command: LightningCLI's fit/validate/test/predict, plus ``defend``."""

from __future__ import annotations

import logging
import pickle
import sys
import tempfile
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins import LayerSync
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_backdoor.classifier import PoisonedClassifier
from lightning_backdoor.dashboard import choose_mode
from lightning_backdoor.data import PoisonedDataModule
from lightning_backdoor.data.datamodule import differing_setting
from lightning_backdoor.data.imageset import ImageSet
from lightning_backdoor.data.poisoning import to_float
from lightning_backdoor.defenses import Defense
from lightning_backdoor.io import first_line, load_state_dict, load_tensors
from lightning_backdoor.models.sync_batchnorm import SyncBatchNormPlugin
from lightning_backdoor.weights import load_weights, map_weights

#: jsonargparse raises instead of printing usage and exiting, so ``main`` can print its error on one line.
PARSER_KWARGS = {"parser_mode": "omegaconf", "exit_on_error": False, "allow_abbrev": False}
#: ``--ckpt_path`` values that Lightning resolves itself (to the run's own checkpoints).
LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")
#: what marks a folder as holding a run or a defense's outputs: ``fit`` into it is refused (nothing is overwritten
#: and no two runs mix), as globs under the folder.
RUN_OUTPUTS = ("config.yaml", "splits.json", "checkpoints/*.ckpt", "defended*.ckpt", "defended*.safetensors",
               "defense_report*.json")
#: the subcommands ``main`` runs itself, before LightningCLI parses; ``--help`` lists them after Lightning's.
OWN_SUBCOMMANDS = {"defend": "Remove the backdoor from a trained model's weights.",
                   "bench": "Compare defenses on the same poisoned models, budgets and seeds."}


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's layout with the description and epilog printed as written (the epilog is a table)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def main_parser_kwargs() -> dict[str, Any]:
    """Keyword arguments of the top-level parser: our name, a description and the :data:`OWN_SUBCOMMANDS`."""
    table = "".join(f"\n    {name:<20}{summary}" for name, summary in OWN_SUBCOMMANDS.items())
    return PARSER_KWARGS | {"prog": "lightning-backdoor", "epilog": f"more subcommands (each with --help):{table}",
                            "description": "Train backdoored image classifiers and remove the backdoor.",
                            "formatter_class": HelpFormatter}


class HeldLines:
    """Lightning's log lines and warnings (seed, devices, logger tips) held back while a command is set up: shown
    when it starts (:meth:`release`), dropped when it is refused, so that a refusal prints its one line only.

    ``show=False`` drops them even when the command runs (``defend`` uses no Trainer loop: they say nothing).
    """

    LOGGERS = ("lightning.pytorch", "lightning.fabric")

    def __init__(self, show: bool = True) -> None:
        self.show = show
        self.records: list[logging.LogRecord] = []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append  # type: ignore[method-assign]
        self.saved: dict[str, tuple[list[logging.Handler], bool]] = {}
        self.warnings = warnings.catch_warnings(record=True)
        self.caught: list[warnings.WarningMessage] | None = None

    def __enter__(self) -> HeldLines:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self.saved[name] = (logger.handlers[:], logger.propagate)
            logger.handlers, logger.propagate = [self.handler], False
        self.caught = self.warnings.__enter__()
        return self

    def release(self) -> None:
        """Stop holding; print what was held (unless ``show`` is false). Idempotent."""
        if self.caught is None:
            return
        self.warnings.__exit__(None, None, None)
        caught, self.caught = self.caught, None
        for name, (handlers, propagate) in self.saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        if self.show:
            for record in self.records:
                logging.getLogger(record.name).handle(record)
            for warning in caught:  # through the filters again, as if raised now
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)

    def __exit__(self, error_type: type | None, *_: object) -> None:
        self.show = self.show and error_type is None
        self.release()


class ReleaseHeldLines(Callback):
    """Prints the :class:`HeldLines` when the Trainer has set up the data and the callbacks before this one."""

    def __init__(self, held: HeldLines) -> None:
        self.held = held

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self.held.release()


class BackdoorCLI(LightningCLI):
    """LightningCLI with the data module's classes, channels and target linked into the model."""

    def __init__(self, *args: object, defend: bool = False, **kwargs: object) -> None:
        self.defend_mode = defend
        #: the ``--ckpt_path`` file as loaded (tensors and plain values), kept until its settings are compared
        self.checkpoint: dict[str, Any] | None = None
        self.checkpoint_path: str | None = None
        #: ``fit`` starts a new fit from a weights-only checkpoint's weights instead of resuming it
        self.fresh_fit = False
        self.held = HeldLines(show=not defend)
        with self.held:
            super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` as Lightning does, without its warning that ``sys.argv`` is set too: ``main`` passes the
        arguments it took from ``sys.argv`` itself."""
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the data module's attribute, not its argument: None under all_to_all (no target-class accuracy)
        parser.link_arguments("data.target_class", "model.init_args.target_class", apply_on="instantiate")
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
            parser.add_argument("--unseen_root", type=str | None, default=None,
                                help="your own clean images, DIR/<class>/<image files> (>= 1 per class): they "
                                     "replace the data module's unseen split")
            parser.add_argument("--test_root", type=str | None, default=None,
                                help="clean test images, DIR/<class>/<image files>: they replace the data module's "
                                     "test split in the before/after evaluation (triggered with its trigger)")
            parser.add_argument("--classes", type=list[str] | None, default=None,
                                help="the model's class names in label order, matched to the folders' class "
                                     "folders (default: the data module's)")
            parser.add_argument("--accept_low_accuracy", type=bool, default=False,
                                help="defend even when the model's accuracy on the unseen images is near chance "
                                     "(usually wrong preprocessing or class order)")

    def before_instantiate_classes(self) -> None:
        """Keep a run in one folder: checkpoints, logs and the W&B run go under ``trainer.default_root_dir``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.default_root_dir or ".")
        used = next((path for pattern in RUN_OUTPUTS for path in sorted(root.glob(pattern))), None)
        if self.subcommand == "fit" and used is not None:
            raise ValueError(f"{root} already holds a run ({used.relative_to(root)}); choose a new "
                             f"--trainer.default_root_dir (nothing is overwritten)")
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
        self._check_checkpoint()
        return super().instantiate_trainer(**kwargs)

    def _check_checkpoint(self) -> None:
        """Refuse a ``--ckpt_path`` whose settings or weights do not fit the instantiated model and data module (one
        line, nothing written); a weights-only checkpoint given to ``fit`` starts a new fit from its weights."""
        if self.checkpoint is None:
            return
        checkpoint, path, self.checkpoint = self.checkpoint, self.checkpoint_path, None
        check_settings(checkpoint, self.model, self.datamodule, path)
        map_weights(self.model.state_dict(), checkpoint["state_dict"])  # names the first mismatching key, if any
        if self.subcommand == "fit" and "optimizer_states" not in checkpoint:
            self.fresh_fit = True
            print(f"{path} holds weights only (no optimizer or loop state, e.g. a defended model): starting a new fit "
                  f"from its weights")
            load_weights(self.model, checkpoint["state_dict"])

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` instead of merging its hyperparameters into the config as Lightning does.

        The file must load as plain tensors (no code runs) and name the config's model class; its settings are
        compared with the instantiated model and data module (:meth:`_check_checkpoint`), never parsed, because
        jsonargparse imports any ``class_path`` it finds in them (a checkpoint could name any installed module).
        The config stays the only source of the run's settings.
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
        self.checkpoint, self.checkpoint_path = checkpoint, str(ckpt_path)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; the held-back Lightning lines print once the data and every callback are set up (their
        checks passed: the command was accepted)."""
        self.trainer.callbacks.append(ReleaseHeldLines(self.held))
        super()._run_subcommand(subcommand)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning's keyword arguments, with checkpoints always loaded as weights only (``last``/``best`` too)."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            kwargs["weights_only"] = True
        if self.fresh_fit:  # the weights are in the model already; Lightning would look for optimizer states
            kwargs["ckpt_path"] = None
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


def check_settings(checkpoint: dict[str, Any], model: nn.Module, datamodule: Any, path: str | Path) -> None:
    """Raise a one-line ``ValueError`` naming the first data setting, else model hyperparameter, that ``checkpoint``
    was trained with and the config changes: its numbers (classes, target, attack) would mean something else.

    Data settings are the data module's ``settings()``, stored by Lightning under the data module's class name;
    model hyperparameters are ``model.hparams``. What the checkpoint does not store is not compared.
    """
    stored = checkpoint.get(type(datamodule).__qualname__)
    settings = datamodule.settings() if hasattr(datamodule, "settings") else {}
    saved_hparams = checkpoint.get("hyper_parameters")
    saved_hparams = {k: v for k, v in saved_hparams.items() if not k.startswith("_")} if isinstance(
        saved_hparams, dict) else {}
    hparams = {key: _plain(value) for key, value in getattr(model, "hparams", {}).items() if not key.startswith("_")}
    for kind, saved, current in (("data", stored.get("settings") if isinstance(stored, dict) else None, settings),
                                 ("model", saved_hparams, hparams)):
        difference = differing_setting(saved, current)
        if difference is not None:
            name, was, now = difference
            raise ValueError(f"{path} was trained with {kind} {name}={str(was)[:100]} but the config says "
                             f"{str(now)[:100]}; pass the run's config")


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
                      parser_kwargs=PARSER_KWARGS | {"prog": "lightning-backdoor defend",
                                                     "description": OWN_SUBCOMMANDS["defend"]},
                      args=args, run=False, defend=True, auto_configure_optimizers=False, save_config_callback=None)
    config = cli.config
    checkpoint = Path(config.checkpoint)
    output_dir = Path(config.output_dir) if config.output_dir else (
        checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent)
    state_dict = load_state_dict(checkpoint)
    if checkpoint.suffix != ".safetensors":  # a Lightning checkpoint also holds the settings it was trained with
        record = load_tensors(checkpoint)
        if isinstance(record, dict) and isinstance(record.get("state_dict"), dict):
            check_settings(record, cli.model, cli.datamodule, checkpoint)
    check_writable(output_dir, "output folder")  # created only when the outputs are written
    configured = next((c for c in cli.trainer.callbacks if isinstance(c, DefenseCallback)), None)
    if configured is None or any(arg.startswith("--defense") for arg in args):
        defense, unseen_per_class = cli.config_init.defense, config.unseen_per_class
    else:  # the run's own fit-end defense, so that `defend` repeats what `fit` did
        defense = configured.defense
        unseen_per_class = (config.unseen_per_class if config.unseen_per_class is not None
                            else configured.unseen_per_class)
    classes = tuple(config.classes) if config.classes is not None else cli.datamodule.classes
    if len(classes) != cli.datamodule.num_classes:
        raise ValueError(f"--classes lists {len(classes)} classes but the model has {cli.datamodule.num_classes}; "
                         f"list its class names in label order")
    unseen_loader = test_loader = None
    if config.unseen_root:
        unseen = own_images(config.unseen_root, classes, cli.datamodule.image_shape, "unseen")
        unseen_loader = float_loader(first_per_class(unseen, unseen_per_class, config.unseen_root))
    if config.test_root:
        test_loader = float_loader(own_images(config.test_root, classes, cli.datamodule.image_shape, "test"))
    load_weights(cli.model, state_dict)  # after every check of the inputs: it prints how the keys were mapped
    callback = DefenseCallback(defense=defense, unseen_per_class=unseen_per_class, trigger_known=config.trigger_known,
                               unseen_dataloader=unseen_loader, test_dataloader=test_loader,
                               accept_low_accuracy=config.accept_low_accuracy)
    callback.defend(cli.model, cli.datamodule, [], output_dir)
    print(f"defended weights: {callback.checkpoint_path}")
    print(f"defense report: {callback.report_path}")


def own_images(folder: str, classes: tuple[str, ...], image_shape: tuple[int, int, int], split: str) -> ImageSet:
    """A defender's ImageFolder (``folder/<class>/<image files>``) as the model sees images: its classes labelled by
    their index in ``classes``, converted to the model's channels and, for square models, resized to its size.

    Raises:
        ValueError: (one line) a class folder not in ``classes``, a class with no images (the ``unseen`` split
            needs every class), an unreadable image, or images of another size than the model's.
    """
    from lightning_backdoor.data.folders import read_image_folder

    channels, height, width = image_shape
    images = read_image_folder(folder, classes=classes, channels=channels,
                               image_size=height if height == width else None)
    missing = images.missing_classes()
    if split == "unseen" and missing:
        raise ValueError(f"--unseen_root {folder} has no images of class {missing[0]!r}; the defense needs >= 1 "
                         f"clean image of every class ({len(classes)} classes)")
    if tuple(images.images.shape[2:]) != (height, width):
        raise ValueError(f"--{split}_root {folder} holds {images.images.shape[2]}x{images.images.shape[3]} images but "
                         f"the model's are {height}x{width}")
    return images


def first_per_class(images: ImageSet, count: int | None, folder: str) -> ImageSet:
    """The first ``count`` images of each class (all when ``count`` is None), in the folder's sorted order.

    Raises:
        ValueError: (one line) a class has fewer than ``count`` images.
    """
    if count is None:
        return images
    kept = []
    for label, name in enumerate(images.classes):
        members = torch.nonzero(images.labels == label).flatten()
        if len(members) < count:
            raise ValueError(f"asked for {count} unseen images per class but {folder}/{name} holds {len(members)}")
        kept.append(members[:count])
    return images.subset(torch.cat(kept))


def float_loader(images: ImageSet, batch_size: int = 1000) -> DataLoader:
    """``(images, labels)`` batches, images float in [0, 1] (N, C, H, W), as the DefenseCallback reads them."""
    return DataLoader(TensorDataset(to_float(images.images), images.labels), batch_size=batch_size)


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
                    parser_kwargs=main_parser_kwargs(), args=args, auto_configure_optimizers=False)
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
