"""The ``lightning-backdoor`` command: LightningCLI's fit/validate/test/predict, plus ``defend``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import Tensor, nn

from lightning_backdoor.classifier import PoisonedClassifier
from lightning_backdoor.dashboard import choose_mode
from lightning_backdoor.data import PoisonedDataModule
from lightning_backdoor.defenses import Defense
from lightning_backdoor.io import load_state_dict


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
                                          help="the defense to run (default: activation editing with repair)")
            parser.add_argument("--unseen_per_class", type=int | None, default=None,
                                help="use the first k unseen images per class (default: all)")
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
        for callback in config.trainer.callbacks or []:
            if callback.class_path.endswith("ModelCheckpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(root / "checkpoints")
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        for logger in loggers:
            if getattr(logger, "class_path", "").endswith("WandbLogger") and logger.init_args.get("save_dir") in (None, "."):
                logger.init_args.save_dir = str(root)
            if getattr(logger, "class_path", "").endswith("WandbLogger"):
                choose_mode(logger.init_args, root)


def load_weights(module: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load ``state_dict`` into a PoisonedClassifier or its bare network; name the first mismatch if neither fits."""
    targets = [module] + ([module.net] if isinstance(getattr(module, "net", None), nn.Module) else [])
    mismatch = ""
    for target in targets:
        expected = target.state_dict()
        relevant = {k: v for k, v in state_dict.items() if not k.startswith(("val_metrics.", "test_metrics."))}
        wanted = {k: v for k, v in expected.items() if not k.startswith(("val_metrics.", "test_metrics."))}
        missing = sorted(set(wanted) - set(relevant))
        unexpected = sorted(set(relevant) - set(wanted))
        shapes = sorted(k for k in set(wanted) & set(relevant) if wanted[k].shape != relevant[k].shape)
        if not (missing or unexpected or shapes):
            target.load_state_dict(relevant, strict=False)
            return
        if not mismatch:
            key = (missing or unexpected or shapes)[0]
            why = ("missing from the checkpoint" if missing else "not in the model" if unexpected else
                   f"shape {tuple(relevant[key].shape)} in the checkpoint vs {tuple(wanted[key].shape)} in the model")
            mismatch = f"checkpoint does not match the model spec: first mismatching key {key!r} ({why})"
    raise ValueError(mismatch)


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
                      parser_kwargs={"parser_mode": "omegaconf"}, args=args, run=False, defend=True,
                      auto_configure_optimizers=False, save_config_callback=None)
    config = cli.config
    checkpoint = Path(config.checkpoint)
    output_dir = Path(config.output_dir) if config.output_dir else (
        checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent)
    state_dict = load_state_dict(checkpoint)
    load_weights(cli.model, state_dict)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise ValueError(f"output folder {output_dir} is not writable; pass --output_dir <writable folder>")
    callback = DefenseCallback(defense=cli.config_init.defense, unseen_per_class=config.unseen_per_class,
                               trigger_known=config.trigger_known)
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
                    parser_kwargs={"parser_mode": "omegaconf"}, args=args, auto_configure_optimizers=False)
    except ValueError as error:
        print(f"lightning-backdoor: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(error: BaseException) -> str:
    """Our own message inside jsonargparse's multi-line wrapping (it lists each union member's error)."""
    chain = [error]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for cause in reversed(chain):
        if isinstance(cause, ValueError) and str(cause) and "\n" not in str(cause).strip():
            return str(cause).strip()
    lines = str(error).strip().splitlines()
    reasons = [line.strip()[2:] for line in lines if line.strip().startswith("- ") and "Expected a" not in line]
    return reasons[0] if reasons else lines[0]


if __name__ == "__main__":
    main()
