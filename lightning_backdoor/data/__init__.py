"""Data: image sources, poisoning plans and the PoisonedDataModule."""

from lightning_backdoor.data.datamodule import PoisonedDataModule
from lightning_backdoor.data.folders import read_image_folder
from lightning_backdoor.data.poisoning import SplitPlan, apply_trigger, attack_labels, plan_splits
from lightning_backdoor.data.sources import SOURCES, ImageSet, load_source

__all__ = ["SOURCES", "ImageSet", "PoisonedDataModule", "SplitPlan", "apply_trigger", "attack_labels", "load_source",
           "plan_splits", "read_image_folder"]
