"""Defenses: activation-guided editing with repair (ours), as plain functions and a Lightning callback."""

from lightning_backdoor.defenses.activation_editing import ActivationEditing
from lightning_backdoor.defenses.base import DEFENSES, Defense, UnseenData, build_defense
from lightning_backdoor.defenses.baselines import (ANP, IBAU, NAD, FinePruning, FineTuning,
                                                   NeuralCleanseUnlearning)

__all__ = ["ANP", "DEFENSES", "IBAU", "NAD", "ActivationEditing", "Defense", "FinePruning", "FineTuning",
           "NeuralCleanseUnlearning", "UnseenData", "build_defense"]
