"""Backdoor triggers: pure-torch functions on image batches in [0, 1], registered by name."""

from lightning_backdoor.triggers.adaptive_blend import AdaptiveBlend
from lightning_backdoor.triggers.additive import Additive
from lightning_backdoor.triggers.badnets import BadNets
from lightning_backdoor.triggers.base import TRIGGERS, PreparedTrigger, Trigger, acts_on_pixels, build_trigger
from lightning_backdoor.triggers.blended import Blended
from lightning_backdoor.triggers.bpp import BppAttack
from lightning_backdoor.triggers.custom import CustomTrigger
from lightning_backdoor.triggers.ftrojan import FTrojan
from lightning_backdoor.triggers.input_aware import InputAware
from lightning_backdoor.triggers.label_consistent import LabelConsistent
from lightning_backdoor.triggers.low_frequency import LowFrequency
from lightning_backdoor.triggers.augmented import (Mirrored, Shifted, augmentation_images, crop_distance,
                                                   distinct_mirror, distinct_shifts)
from lightning_backdoor.triggers.sig import SIG
from lightning_backdoor.triggers.trojannn import TrojanNN
from lightning_backdoor.triggers.wanet import WaNet

__all__ = ["TRIGGERS", "AdaptiveBlend", "Additive", "BadNets", "Blended", "BppAttack", "CustomTrigger", "FTrojan",
           "InputAware", "LabelConsistent", "LowFrequency", "Mirrored", "PreparedTrigger", "SIG", "Shifted", "Trigger",
           "TrojanNN", "WaNet", "acts_on_pixels", "augmentation_images", "build_trigger", "crop_distance",
           "distinct_mirror", "distinct_shifts"]
