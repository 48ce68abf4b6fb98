"""The ``BackdoorCLI``: LightningCLI over the :class:`~lightning_backdoor.classifier.PoisonedClassifier` and
:class:`~lightning_backdoor.data.PoisonedDataModule`, with a run kept in one folder and checkpoints read as plain
tensors whose stored settings must match the config.

Used by :mod:`lightning_backdoor.runs` (parsing and loading a run), :mod:`lightning_backdoor.bench` (training the
bench's models) and :mod:`lightning_backdoor.cli` (the ``lightning-backdoor`` command).
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
import tempfile
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins import LayerSync
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_backdoor.classifier import PoisonedClassifier
from lightning_backdoor.dashboard import choose_mode
from lightning_backdoor.data import PoisonedDataModule
from lightning_backdoor.data.datamodule import differing_setting
from lightning_backdoor.defenses import Defense
from lightning_backdoor.defenses.callback import DefenseCallback
from lightning_backdoor.io import check_weights_file, load_tensors
from lightning_backdoor.models.registry import check_model_name
from lightning_backdoor.models.sync_batchnorm import SyncBatchNormPlugin
from lightning_backdoor.precision import trainer_precision
from lightning_backdoor.weights import load_weights, map_weights

#: jsonargparse raises instead of printing usage and exiting, so ``main`` can print its error on one line.
PARSER_KWARGS = {"parser_mode": "omegaconf", "exit_on_error": False, "allow_abbrev": False}
#: ``--ckpt_path`` values that Lightning resolves itself (to the run's own checkpoints).
LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")
#: what marks a folder as holding a run or a defense's outputs: ``fit`` into it is refused (nothing is overwritten
#: and no two runs mix), as globs under the folder.
RUN_OUTPUTS = ("config.yaml", "splits.json", "checkpoints/*.ckpt", "defended*.ckpt", "defended*.safetensors",
               "defense_report*.json")
#: what a fit writes into its run folder before its first checkpoint: removed again when it fails before one
#: (:class:`ClearFailedStart`), so that the half-made folder does not refuse a rerun
STARTED_RUN_FILES = ("config.yaml", "splits.json", "environment.json")


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


class ClearFailedStart(Callback):
    """When a fit fails before it saved anything that can be resumed or used (no checkpoint, no defended weights or
    report), removes the :data:`STARTED_RUN_FILES` it wrote into ``root``, which would make a rerun into the same
    folder be refused as "already holds a run": e.g. a streamed image that turns out not to decode in the first
    epoch (streaming reads headers only before the run starts; decoding every file first would take as long as an
    epoch). Files the folder held before the fit are kept; logs are kept. Rank 0 only (the rank that wrote them).

    Args:
        root: the run folder (``trainer.default_root_dir``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.held_before = {name for name in STARTED_RUN_FILES if (root / name).exists()}

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        if not trainer.is_global_zero:
            return
        kept = [path for pattern in RUN_OUTPUTS for path in self.root.glob(pattern)
                if path.name not in STARTED_RUN_FILES]
        saved = [callback for callback in trainer.checkpoint_callbacks
                 if getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")]
        if kept or saved:  # a checkpoint to resume from, or a defense's outputs: the folder holds a run
            return
        removed = [name for name in STARTED_RUN_FILES if name not in self.held_before and (self.root / name).exists()]
        for name in removed:
            (self.root / name).unlink()
        if removed:
            rank_zero_info(f"fit: failed before its first checkpoint; removed {', '.join(removed)} from {self.root} so "
                           f"that a rerun into it is accepted")


#: the model's options the CLI sets from the data module's attribute of the same name (e.g. ``num_classes`` from
#: the class folders), with what each is: a value given for one on the command line would be dropped, so it is
#: refused
LINKED_FROM_DATA = {"target_class": "its target_class; None under all_to_all", "num_classes": "its class count",
                    "in_channels": "its images' channels"}


def linked_in_config(source: str, whole_config: bool = True) -> str | None:
    """The first of :data:`LINKED_FROM_DATA` that a ``--config`` (``whole_config``) or ``--model`` value sets under
    the model's ``init_args`` (or directly, as jsonargparse's shorthand), or None. ``source``: a YAML file's path or
    the YAML itself; a whole config's model may also sit under a subcommand (``fit: {model: ...}``). What cannot be
    read as YAML mapping is left to the parser, which reports it."""
    try:
        text = Path(source).read_text() if Path(source).is_file() else source
        loaded = yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(loaded, dict):
        return None
    models = ([loaded.get("model"), *(part.get("model") for part in loaded.values() if isinstance(part, dict))]
              if whole_config else [loaded])
    for model in models:
        if isinstance(model, dict):
            options = {**model, **(model.get("init_args") if isinstance(model.get("init_args"), dict) else {})}
            for name in LINKED_FROM_DATA:
                if name in options:
                    return name
    return None


class BackdoorCLI(LightningCLI):
    """LightningCLI with the data module's classes, channels and target linked into the model.

    Args:
        model_class: the LightningModule, or base class of those chosen by ``model.class_path``.
        datamodule_class: the data module, or base class of those chosen by ``data.class_path``.
        defend: add the ``defend`` command's arguments (``--checkpoint``, ``--defense``...) and drop Lightning's
            held-back log lines even when the command runs (``defend`` runs no Trainer loop).
        kwargs: :class:`~lightning.pytorch.cli.LightningCLI`'s (``args``, ``run``, ``parser_kwargs``...).

    Raises:
        ValueError: (one line) a refused command: a run folder already in use or not writable, a checkpoint that
            is not plain tensors, names another model class or was trained with other settings, ``--weights_only
            =false``. Nothing is written before it is raised.
    """

    def __init__(self, model_class: type[LightningModule] = PoisonedClassifier,
                 datamodule_class: type[LightningDataModule] = PoisonedDataModule, *, defend: bool = False,
                 subclass_mode_model: bool = True, subclass_mode_data: bool = True,
                 auto_configure_optimizers: bool = False, **kwargs: Any) -> None:
        self.defend_mode = defend
        #: no subcommand (``run=False``, e.g. :func:`~lightning_backdoor.runs.instantiate_run`): the parser takes a
        #: fit's saved config.yaml too, as ``defend`` does
        self.parse_only = not kwargs.get("run", True)
        #: the ``--ckpt_path`` file as loaded (tensors and plain values), kept until its settings are compared
        self.checkpoint: dict[str, Any] | None = None
        self.checkpoint_path: str | None = None
        #: ``fit`` starts a new fit from a weights-only checkpoint's weights instead of resuming it
        self.fresh_fit = False
        self.held = HeldLines(show=not defend)
        with self.held:
            super().__init__(model_class, datamodule_class, subclass_mode_model=subclass_mode_model,
                             subclass_mode_data=subclass_mode_data,
                             auto_configure_optimizers=auto_configure_optimizers, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` as Lightning does, without its warning that ``sys.argv`` is set too: ``main`` passes the
        arguments it took from ``sys.argv`` itself."""
        arguments = [str(arg) for arg in (sys.argv[1:] if args is None else args if isinstance(args, list) else [])]
        for index, arg in enumerate(arguments):
            option, equals, value = arg.partition("=")  # --model.init_args.X, or jsonargparse's shorthand --model.X
            name = option.removeprefix("--model.").removeprefix("init_args.")
            if option.startswith("--model.") and name in LINKED_FROM_DATA:  # jsonargparse would drop it silently
                raise ValueError(f"model.init_args.{name} is set from the data ({LINKED_FROM_DATA[name]}); remove "
                                 f"the option (change the data config instead)")
            if option in ("--config", "-c", "--model") and (equals or index + 1 < len(arguments)):
                source = value if equals else arguments[index + 1]
                linked = linked_in_config(source, whole_config=option != "--model")
                if linked is not None:
                    raise ValueError(f"{Path(source).name if Path(source).is_file() else option} sets "
                                     f"model.init_args.{linked}, which is set from the data "
                                     f"({LINKED_FROM_DATA[linked]}); remove it (change the data config instead)")
        try:
            self.config = (parser.parse_object(args) if isinstance(args, (dict, Namespace))
                           else parser.parse_args(args))
        except ArgumentError as error:
            raise with_closest_option(error, parser, args) from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the data module's attribute, not its argument: None under all_to_all (no target-class accuracy)
        for name in LINKED_FROM_DATA:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        if self.defend_mode:
            parser.add_argument("--checkpoint", type=str, required=True,
                                help="model weights: a Lightning checkpoint, a state_dict file or .safetensors")
            parser.add_subclass_arguments(Defense, "defense", required=False,
                                          default={"class_path": "lightning_backdoor.defenses.ActivationEditing"},
                                          help="the defense to run (default: the config's DefenseCallback "
                                               "defense, else ActivationEditing with its defaults: layer auto, "
                                               "strength 10, repair on; --defense.init_args.strength null chooses "
                                               "the strength on the unseen images too)")
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
        if self.defend_mode or self.parse_only:
            # a fit's saved config.yaml (``--config runs/<run>/config.yaml``) holds fit's own two keys: null there
            parser.add_argument("--ckpt_path", type=str | None, default=None,
                                help="fit/test's option, accepted so that a run's config.yaml can be passed; must "
                                     "be null (defend reads --checkpoint)")
            parser.add_argument("--weights_only", type=bool | None, default=None,
                                help="fit/test's option, accepted so that a run's config.yaml can be passed; "
                                     "checkpoints always load as weights only")

    def before_instantiate_classes(self) -> None:
        """Check ``--ckpt_path`` (:meth:`_read_ckpt_path`) and the model's name (a class path imports:
        :func:`~lightning_backdoor.models.registry.check_model_name`, before any data is decoded), then keep a run in
        one folder: checkpoints, logs and the W&B run go under ``trainer.default_root_dir``."""
        self._read_ckpt_path()
        config = self.config[self.subcommand] if self.subcommand else self.config
        model_name = (config.get("model") or {}).get("init_args", {}).get("model")
        if isinstance(model_name, str):  # before the data module decodes a data set to give the model its classes
            check_model_name(model_name)
        if self.defend_mode and config.get("trigger_known") and not names_a_trigger(config):
            raise ValueError("the data config names no trigger (data.init_args.trigger), so the defense cannot use it "
                             "as known: describe the attack's trigger (docs/getting-started.md, 'Your own trigger'), "
                             "or pass --trigger_known false to estimate it")
        if self.defend_mode and config.get("ckpt_path") is not None:
            raise ValueError(f"defend reads its weights from --checkpoint, not --ckpt_path ({config.ckpt_path!r}); "
                             f"add --ckpt_path=null (or set ckpt_path: null in the config)")
        if self.defend_mode and config.get("checkpoint"):  # before the data module decodes (and caches) a data set
            check_weights_file(config.checkpoint)
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
            if not getattr(logger, "class_path", "").endswith("WandbLogger"):
                continue
            if logger.init_args.get("save_dir") in (None, "."):
                logger.init_args.save_dir = str(root)
            choose_mode(logger.init_args, root)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer; ``sync_batchnorm`` uses :class:`SyncBatchNormPlugin`, which also syncs on CPU. A
        bfloat16 ``precision`` on a CPU run (``accelerator`` ``cpu``, ``auto`` or a ``CPUAccelerator``) whose CPU has
        no native bfloat16 runs as ``32-true``, said in one line
        (:func:`~lightning_backdoor.precision.trainer_precision`): the config keeps the recipe, the run's
        ``environment.json`` records the precision that ran."""
        config = self.config_init.get(str(self.subcommand), self.config_init).get("trainer", {})
        accelerator = config.get("accelerator")
        if not isinstance(accelerator, str):  # an Accelerator object (a class_path in the config): only the CPU's
            accelerator = "cpu" if isinstance(accelerator, CPUAccelerator) else ""
        precision = trainer_precision(config.get("precision"), accelerator)
        if "precision" not in kwargs and precision != config.get("precision"):
            rank_zero_info(f"trainer: precision {config.get('precision')} -> {precision}: this CPU computes bfloat16 "
                           f"only by emulation, several times slower than float32 (lightning_backdoor.precision)")
            kwargs["precision"] = precision
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

    # private override: Lightning's merges the checkpoint's hyperparameters into the config (importing any class_path
    # they name) before any public hook runs; nothing else turns it off. Our check is _read_ckpt_path.
    def _parse_ckpt_path(self) -> None:
        """Do not read ``--ckpt_path`` while parsing (see :meth:`_read_ckpt_path`)."""

    def _read_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` instead of merging its hyperparameters into the config as Lightning does.

        The file must load as plain tensors (no code runs) and name the config's model class; its settings are
        compared with the instantiated model and data module (:meth:`_check_checkpoint`), never parsed, because
        jsonargparse imports any ``class_path`` it finds in them (a checkpoint could name any installed module).
        The config stays the only source of the run's settings.
        """
        config = self.config[self.subcommand] if self.subcommand else None
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

    def after_instantiate_classes(self) -> None:
        """Before a subcommand runs: the held-back Lightning lines print once the data and every callback are set
        up (their checks passed: the command was accepted); a fit's :class:`DefenseCallback` checks run now, before
        the Trainer starts its loggers (:meth:`DefenseCallback.check_before_fit`); checkpoints load as weights only
        (``last``/``best`` too); a fit from a weights-only checkpoint's weights resumes nothing."""
        if self.subcommand is None:
            return
        self.trainer.callbacks.append(ReleaseHeldLines(self.held))
        if self.subcommand == "fit":
            self.trainer.callbacks.append(ClearFailedStart(Path(self.trainer.default_root_dir)))
            for callback in self.trainer.callbacks:  # before the Trainer starts W&B: a refusal writes nothing
                if isinstance(callback, DefenseCallback):
                    callback.check_before_fit(self.model, self.datamodule)
        arguments = self.config_init[self.subcommand]  # what Lightning passes to the Trainer's method
        if "weights_only" in arguments:
            arguments["weights_only"] = True
        if self.fresh_fit:  # the weights are in the model already; Lightning would look for optimizer states
            arguments["ckpt_path"] = None


def names_a_trigger(config: Namespace) -> bool:
    """Whether a command's ``config`` names the trigger its data carries: always, unless its data module is a
    :class:`~lightning_backdoor.data.PoisonedDataModule` given no ``trigger`` (it then holds its default BadNets
    patch, which ``fit`` poisons with but which says nothing about a model that ``defend`` is handed)."""
    data = config.get("data") or {}
    if not str(data.get("class_path", "")).endswith("PoisonedDataModule"):
        return True
    return (data.get("init_args") or {}).get("trigger") is not None


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
    was trained with and the config changes: its numbers (classes, target, attack) would mean something else. Another
    architecture (the ``model`` hyperparameter) is named before anything else: no other setting could mend it.

    Data settings are the data module's ``settings()``, stored by Lightning under the data module's class name;
    model hyperparameters are ``model.hparams``. What the checkpoint does not store is not compared.
    """
    stored = checkpoint.get(type(datamodule).__qualname__)
    settings = datamodule.settings() if hasattr(datamodule, "settings") else {}
    saved_hparams = checkpoint.get("hyper_parameters")
    saved_hparams = {k: v for k, v in saved_hparams.items() if not k.startswith("_")} if isinstance(
        saved_hparams, dict) else {}
    hparams = {key: _plain(value) for key, value in getattr(model, "hparams", {}).items() if not key.startswith("_")}
    architecture = ({"model": saved_hparams["model"]}, {"model": hparams["model"]}) if (
        "model" in saved_hparams and "model" in hparams) else ({}, {})
    for kind, saved, current in (("model", *architecture),
                                 ("data", stored.get("settings") if isinstance(stored, dict) else None, settings),
                                 ("model", saved_hparams, hparams)):
        difference = differing_setting(saved, current)
        if difference is not None:
            name, was, now = difference
            hint = ("; `defend --unseen_per_class K` uses the first K of the run's unseen images per class"
                    if name == "unseen_per_class" else "")
            raise ValueError(f"{path} was trained with {kind} {name}={str(was)[:100]} but the config says "
                             f"{str(now)[:100]}; pass the run's config{hint}")


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



def with_closest_option(error: ArgumentError, parser: ArgumentParser, args: Any) -> ArgumentError:
    """``error`` with the parser's closest option when it is an unrecognised one (``unrecognized arguments:
    --trainer.max_epoch 3`` gets ``; did you mean --trainer.max_epochs?``), looked up among the options of the
    subcommand named in ``args`` (``fit``, ``test``...) or of ``parser`` itself; ``error`` unchanged otherwise, and
    for a name spelt with hyphens (``main`` suggests its underscore spelling)."""
    found = re.match(r"unrecognized arguments: --([\w.]+)(?=[\s=]|$)", str(error))
    if found is None:
        return error
    options = parser
    subcommands = getattr(parser, "_subcommands_action", None)
    if subcommands is not None and not isinstance(args, (dict, Namespace)):
        named = [arg for arg in (sys.argv[1:] if args is None else args) if arg in subcommands._name_parser_map]
        if named:
            options = subcommands._name_parser_map[named[0]]
    known = [option[2:] for action in options._actions for option in action.option_strings
             if option.startswith("--") and not option.endswith((".help", "+"))]
    close = difflib.get_close_matches(found.group(1), known, n=1, cutoff=0.75)
    if not close:
        return error
    return ArgumentError(None, f"{error}; did you mean --{close[0]}?")
