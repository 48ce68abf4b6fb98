"""The ``lightning-backdoor`` command: LightningCLI's fit/validate/test/predict, plus ``defend`` and ``bench``.

This module only dispatches and reports; nothing in the package imports it. The CLI class is
:class:`lightning_backdoor.backdoor_cli.BackdoorCLI`, loading a run is :mod:`lightning_backdoor.runs`, the bench
is :mod:`lightning_backdoor.bench`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import pickle
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
from jsonargparse import DefaultHelpFormatter
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_backdoor.backdoor_cli import PARSER_KWARGS, BackdoorCLI, check_writable, names_a_trigger
from lightning_backdoor.bench import run_bench
from lightning_backdoor.data import PoisonedDataModule
from lightning_backdoor.data.folders import read_image_folder
from lightning_backdoor.data.imageset import ImageSet
from lightning_backdoor.data.poisoning import to_float
from lightning_backdoor import defenses, triggers
from lightning_backdoor.defenses.base import Defense
from lightning_backdoor.defenses.callback import DefenseCallback, defense_device
from lightning_backdoor.io import first_line
from lightning_backdoor.runs import read_weights
from lightning_backdoor.weights import load_weights

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


def run_defend(args: list[str]) -> None:
    """``lightning-backdoor defend``: load weights without running code, defend, write report and weights."""
    cli = BackdoorCLI(parser_kwargs=PARSER_KWARGS | {"prog": "lightning-backdoor defend",
                                                     "description": OWN_SUBCOMMANDS["defend"]},
                      args=args, run=False, defend=True, save_config_callback=None)
    config = cli.config
    checkpoint = Path(config.checkpoint)
    output_dir = Path(config.output_dir) if config.output_dir else (
        checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent)
    state_dict = read_weights(checkpoint, cli.model, cli.datamodule)
    check_writable(output_dir, "output folder")  # created only when the outputs are written
    configured = next((c for c in cli.trainer.callbacks if isinstance(c, DefenseCallback)), None)
    given = [arg for arg in args if arg.startswith("--defense")]
    replaced = {}
    if configured is None or given:
        defense = cli.config_init.defense
        # the budget is the run's, whatever the defense: --defense options do not reset it to the data's whole split
        unseen_per_class = (config.unseen_per_class if config.unseen_per_class is not None or configured is None
                            else configured.unseen_per_class)
        if configured is not None:  # the settings of the config's defense that the options do not repeat
            replaced = {name: pair for name, pair in replaced_settings(configured.defense, defense).items()
                        if not any(re.search(rf"[.-]{name}\b", arg) for arg in given)}
    else:  # the run's own fit-end defense, so that `defend` repeats what `fit` did
        defense = configured.defense
        unseen_per_class = (config.unseen_per_class if config.unseen_per_class is not None
                            else configured.unseen_per_class)
    classes = tuple(config.classes) if config.classes is not None else cli.datamodule.classes
    if len(classes) != cli.datamodule.num_classes:
        raise ValueError(f"--classes lists {len(classes)} classes but the model has {cli.datamodule.num_classes}; "
                         f"list its class names in label order")
    conflict = order_conflict(classes, tuple(cli.datamodule.classes),
                              [split for split, root in (("unseen", config.unseen_root), ("test", config.test_root))
                               if not root])
    if conflict is not None:
        raise ValueError(conflict)
    unseen_loader = test_loader = None
    if config.unseen_root:
        unseen = own_images(config.unseen_root, classes, cli.datamodule, "unseen")
        unseen_loader = float_loader(first_per_class(unseen, unseen_per_class, config.unseen_root))
    if config.test_root:
        test_loader = float_loader(own_images(config.test_root, classes, cli.datamodule, "test"))
    callback = DefenseCallback(defense=defense, unseen_per_class=unseen_per_class, trigger_known=config.trigger_known,
                               unseen_dataloader=unseen_loader, test_dataloader=test_loader,
                               accept_low_accuracy=config.accept_low_accuracy, test_trigger=names_a_trigger(config),
                               class_names=classes)
    if not callback.test_trigger:
        print("defense: the data config names no trigger: the test images are evaluated clean, the true ASR is not "
              "measured", file=sys.stderr)
    callback.check(cli.model, cli.datamodule)  # the setup checks (on the model's structure) before any line is printed
    load_weights(cli.model, state_dict)  # after every check of the inputs: it prints how the keys were mapped
    cli.model.to(defense_device(cli.trainer))  # the Trainer's GPU (accelerator auto: one where there is one)
    if replaced:
        print("defense: the --defense options replace the config's defense; not repeated, so back to the defaults: "
              + ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in replaced.items()),
              file=sys.stderr)  # a warning, beside the defense's other progress lines
    callback.defend(cli.model, cli.datamodule, [], output_dir, weights_source=str(checkpoint.resolve()))
    print(f"defended weights: {callback.checkpoint_path}")
    print(f"defense report: {callback.report_path}")


def order_conflict(given: tuple[str, ...], configured: tuple[str, ...], from_config: list[str]) -> str | None:
    """The refusal when ``--classes`` (``given``) names the data config's classes (``configured``) in another order
    while the splits ``from_config`` still come from the data config, labelled in its order: the two label orders
    cannot both be the model's, so either those splits' figures or the unseen labels would be wrong. ``None`` when
    the orders agree, the names are not the same set (nothing to compare), or every split is the user's own."""
    if not from_config or given == configured or sorted(given) != sorted(configured):
        return None
    moved = [f"label {label}: {name!r} in --classes, {configured[label]!r} in the data config"
             for label, name in enumerate(given) if name != configured[label]]
    splits = " and ".join(from_config)
    roots = " and ".join(f"--{split}_root" for split in from_config)
    return (f"--classes orders the classes unlike the data config ({'; '.join(moved[:3])}"
            f"{'; ...' if len(moved) > 3 else ''}), whose {splits} split{'s' if len(from_config) > 1 else ''} this "
            f"run uses in the data config's order: give {roots} labelled in the order of --classes too, or drop "
            f"--classes if the data config's order is the model's")


def replaced_settings(configured: Defense, given: Defense) -> dict[str, tuple[Any, Any]]:
    """The plain settings (numbers, strings, booleans, ``None`` and tuples) in which the config's defense
    ``configured`` and the defense built from ``--defense`` options ``given`` differ, by name: (configured, given);
    ``{"defense": (class names)}`` when they are not of one class."""
    if type(configured) is not type(given):
        return {"defense": (type(configured).__name__, type(given).__name__)}
    plain = (int, float, str, bool, type(None), tuple)
    return {name: (value, vars(given).get(name)) for name, value in vars(configured).items()
            if isinstance(value, plain) and vars(given).get(name) != value}


def own_images(folder: str, classes: tuple[str, ...], data: PoisonedDataModule, split: str) -> ImageSet:
    """A defender's ImageFolder (``folder/<class>/<image files>``) prepared as the model's data config prepares its
    images: its classes labelled by their index in ``classes``, converted to the model's channels, and resized
    with the config's geometry (``data``'s ``image_shape``, ``image_size`` and ``center_crop``): with
    ``center_crop``, the shorter side resized to ``image_size`` (default: the crop) and the centre cut out, as in
    training; else, for square models, resized square to their size.

    Raises:
        ValueError: (one line) a class folder not in ``classes``, a class with no images (the ``unseen`` split
            needs every class), an unreadable image, or images of another size than the model's.
    """
    channels, height, width = data.image_shape
    image_size = data.image_size if data.center_crop is not None else (height if height == width else None)
    images = read_image_folder(folder, classes=classes, channels=channels, image_size=image_size,
                               center_crop=data.center_crop)
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
            raise ValueError(f"asked for {count} unseen images per class (--unseen_per_class, else the config's "
                             f"DefenseCallback) but {folder}/{name} holds {len(members)}: pass --unseen_per_class "
                             f"{len(members)} or fewer, or add images")
        kept.append(members[:count])
    return images.subset(torch.cat(kept))


def float_loader(images: ImageSet, batch_size: int = 1000) -> DataLoader:
    """``(images, labels)`` batches, images float in [0, 1] (N, C, H, W), as the DefenseCallback reads them."""
    return DataLoader(TensorDataset(to_float(images.images), images.labels), batch_size=batch_size)


#: warnings of the libraries below us that a user can do nothing about (Lightning's own use of a deprecated torch
#: API; its model summary counting bf16-mixed weights as 32-bit), by message pattern
THIRD_PARTY_NOISE = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                     r"Precision bf16-mixed is not supported by the model summary")
#: Lightning's info-level loggers, whose advertisement for its hosted logger is dropped
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def quiet_third_party_noise() -> None:
    """Drop the console lines of :data:`THIRD_PARTY_NOISE` and Lightning's LitLogger tip; every other warning and
    line is kept."""
    for pattern in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage())


def main(args: list[str] | None = None) -> None:
    """Entry point of the console script."""
    argv = sys.argv[1:] if args is None else args
    torch.set_float32_matmul_precision("high")
    quiet_third_party_noise()
    try:
        if argv and argv[0] == "defend":
            run_defend(argv[1:])
            return
        if argv and argv[0] == "bench":
            run_bench(argv[1:])
            return
        BackdoorCLI(parser_kwargs=main_parser_kwargs(), args=args)
    except (ValueError, ArgumentError, pickle.UnpicklingError, MisconfigurationException) as error:
        line = one_line(error)
        if re.match(r"missing .*--(data|model)\b", line) and not any(arg.startswith("--config") for arg in argv):
            line += ("; no --config given: describe the run with one (e.g. --config configs/quickstart.yaml, or a "
                     "run's saved config.yaml)")
        print(f"lightning-backdoor: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    except ModuleNotFoundError as error:  # an accelerator whose package is missing (tpu: torch_xla)
        if not _raised_in(error, "accelerators"):
            raise
        print(f"lightning-backdoor: error: trainer.accelerator: {first_line(error)}; use --trainer.accelerator=auto "
              f"or cpu", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(error: BaseException) -> str:
    """Our own message inside jsonargparse's multi-line wrapping (it lists each union member's error)."""
    if isinstance(error, ArgumentError):
        return with_suggestion(parser_error_line(str(error)))
    if isinstance(error, pickle.UnpicklingError):  # Lightning's own weights-only load (`--ckpt_path best`/`hpc`)
        return f"refusing to load the checkpoint: not a plain tensor file ({first_line(error)})"
    if isinstance(error, MisconfigurationException) and "No supported gpu backend" in str(error):
        return (f"trainer.accelerator: {first_line(error)} (neither CUDA nor MPS); use --trainer.accelerator=auto "
                f"or cpu")
    if isinstance(error, MisconfigurationException) and "can not run on your system" in str(error):
        name = str(error).split("`")[1] if str(error).count("`") >= 2 else "that accelerator"  # e.g. CUDAAccelerator
        return f"trainer.accelerator: {name} is not available on this machine; use --trainer.accelerator=auto or cpu"
    chain = [error]
    while (underlying := _shown_below(chain[-1])) is not None:
        chain.append(underlying)
    single = [cause for cause in chain if isinstance(cause, ValueError) and str(cause)
              and "\n" not in str(cause).strip()]
    # the innermost of ours (a numpy or torch error below it, e.g. "allow_pickle=False", is its cause, not the news)
    for cause in reversed(single):
        if _raised_by_us(cause):
            return str(cause).strip()
    if single:
        return str(single[-1]).strip()
    lines = str(error).strip().splitlines()
    reasons = [line.strip()[2:] for line in lines if line.strip().startswith("- ") and "Expected a" not in line]
    return reasons[0] if reasons else lines[0]


def _shown_below(error: BaseException) -> BaseException | None:
    """The exception Python's traceback shows under ``error``: its ``__cause__``, else its ``__context__`` unless
    ``raise ... from None`` hid it (the wrapper's message already says what the hidden error meant, e.g. which file
    could not be read)."""
    if error.__cause__ is not None:
        return error.__cause__
    return None if error.__suppress_context__ else error.__context__


def _raised_by_us(error: BaseException) -> bool:
    """Whether ``error`` was raised in this package's code (the innermost frame of its traceback)."""
    return _raised_in(error, "lightning_backdoor")


def _raised_in(error: BaseException, folder: str) -> bool:
    """Whether the innermost frame of ``error``'s traceback is in a file under a folder named ``folder``."""
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return trace is not None and folder in Path(trace.tb_frame.f_code.co_filename).parts


#: the package and base class of each argument that takes a class by name (``--defense ActivationEditing``)
_CLASS_ARGUMENTS: dict[str, tuple[Any, type]] = {"defense": (defenses, defenses.Defense),
                                                 "trigger": (triggers, triggers.Trigger)}


def with_suggestion(line: str) -> str:
    """``line`` and, when it names a class that does not exist for ``--defense`` or a ``trigger`` (a bare name, or
    a path into this package), the known class names closest to it, e.g. ``defense: no class named
    'ActivationEditting'; did you mean ActivationEditing?``. A path into another package keeps its own error. An
    option a class of this package does not take gets its closest arguments (:func:`_option_suggestion`), an
    unrecognised option spelt with hyphens its underscore spelling (``--output-dir``: ``did you mean
    --output_dir?``), a value ``auto`` or ``None`` where a type was expected the spelling of None (``null``), and a
    missing required argument its option (``missing --checkpoint``)."""
    if (suggestion := _option_suggestion(line)) is not None:
        return f"{line}; {suggestion}"
    if required := re.fullmatch(r"the following arguments are required: ([\w., ]+)", line):  # named as options
        names = [re.sub(r"^(fit|validate|test|predict)\.", "", name.strip()) for name in required.group(1).split(",")]
        return "missing " + ", ".join(f"--{name}" for name in names)
    if hyphenated := re.match(r"unrecognized arguments: --([\w.]*-[\w.-]*)", line):
        return f"{line}; options are spelt with underscores: did you mean --{hyphenated.group(1).replace('-', '_')}?"
    if re.search(r", got '(?:auto|None|none|NONE)'$", line):  # Python's and the benchmarks' names for null
        return f"{line}; where an option accepts None, write null"
    found = re.fullmatch(r"(.*?)(\w+): (?:Expected a dot import path string: (\w+)|class_path "
                         r"'lightning_backdoor\.[\w.]+\.(\w+)': module '[\w.]+' has no attribute .*)", line)
    if found is None or found.group(2) not in _CLASS_ARGUMENTS:
        return line
    given, (package, base) = found.group(3) or found.group(4), _CLASS_ARGUMENTS[found.group(2)]
    known = sorted(name for name in package.__all__ if inspect.isclass(value := getattr(package, name))
                   and issubclass(value, base) and not inspect.isabstract(value))
    close = difflib.get_close_matches(given, known, n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(sorted(known))}"
    return f"{found.group(1)}{found.group(2)}: no class named {given!r}; {hint}"


def _option_suggestion(line: str) -> str | None:
    """For jsonargparse's ``class_path 'lightning_backdoor.X': Option 'name' is not accepted``: the arguments of X
    closest to ``name`` (``did you mean strength?``), else all of them; None for any other line or another
    package's class (it is not imported here)."""
    found = re.search(r"class_path '(lightning_backdoor(?:\.\w+)+)': Option '(\w+)' is not accepted$", line)
    if found is None:
        return None
    module, _, name = found.group(1).rpartition(".")
    owner = getattr(importlib.import_module(module), name, None)
    if not inspect.isclass(owner):
        return None
    accepted = [parameter.name for parameter in inspect.signature(owner).parameters.values()
                if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)]
    close = difflib.get_close_matches(found.group(2), accepted, n=2)
    return f"did you mean {' or '.join(close)}?" if close else f"its options: {', '.join(accepted)}"


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
