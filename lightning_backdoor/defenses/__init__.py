"""Defenses: activation-guided editing with repair (ours), as plain functions and a Lightning callback."""

from lightning_backdoor.defenses.activation_editing import ActivationEditing
from lightning_backdoor.defenses.base import DEFENSES, Defense, UnseenData, build_defense

__all__ = ["DEFENSES", "ActivationEditing", "Defense", "UnseenData", "build_defense"]
