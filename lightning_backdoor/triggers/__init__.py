"""Backdoor triggers: pure-torch functions on image batches in [0, 1], registered by name."""

from lightning_backdoor.triggers.adaptive_blend import AdaptiveBlend
from lightning_backdoor.triggers.additive import Additive
from lightning_backdoor.triggers.badnets import BadNets
from lightning_backdoor.triggers.base import TRIGGERS, Trigger, build_trigger
from lightning_backdoor.triggers.blended import Blended
from lightning_backdoor.triggers.bpp import BppAttack
from lightning_backdoor.triggers.custom import CustomTrigger
from lightning_backdoor.triggers.ftrojan import FTrojan
from lightning_backdoor.triggers.sig import SIG
from lightning_backdoor.triggers.wanet import WaNet

__all__ = ["TRIGGERS", "AdaptiveBlend", "Additive", "BadNets", "Blended", "BppAttack", "CustomTrigger", "FTrojan", "SIG",
           "Trigger", "WaNet", "build_trigger"]
