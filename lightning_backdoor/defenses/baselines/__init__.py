"""Baseline defenses of the field, each a small :class:`~lightning_backdoor.defenses.base.Defense` subclass
registered by name: ``ft``, ``fp``, ``nad``, ``nc`` (= estimation + ``unlearning``), ``anp``, ``ibau``."""

from lightning_backdoor.defenses.baselines.anp import ANP
from lightning_backdoor.defenses.baselines.fine_pruning import FinePruning
from lightning_backdoor.defenses.baselines.fine_tuning import FineTuning
from lightning_backdoor.defenses.baselines.ibau import IBAU
from lightning_backdoor.defenses.baselines.nad import NAD
from lightning_backdoor.defenses.baselines.neural_cleanse import NeuralCleanseUnlearning, Unlearning

__all__ = ["ANP", "IBAU", "NAD", "FinePruning", "FineTuning", "NeuralCleanseUnlearning", "Unlearning"]
