"""The ``lightning-backdoor`` command: LightningCLI for fit/validate/test/predict."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_backdoor.classifier import PoisonedClassifier
from lightning_backdoor.data import PoisonedDataModule


class BackdoorCLI(LightningCLI):
    """LightningCLI with the data module's classes, channels and target linked into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.target_class", "model.init_args.target_class")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")

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


def main(args: list[str] | None = None) -> None:
    """Entry point of the console script."""
    try:
        BackdoorCLI(PoisonedClassifier, PoisonedDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    parser_kwargs={"parser_mode": "omegaconf"}, args=args, auto_configure_optimizers=False)
    except ValueError as error:
        print(f"lightning-backdoor: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
