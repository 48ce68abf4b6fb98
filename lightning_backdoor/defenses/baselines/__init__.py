"""Baseline defenses of the field, each a small :class:`~lightning_backdoor.defenses.base.Defense` subclass
registered by name: ``ft``, ``fp``, ``nad``, ``nc`` (= estimation + ``unlearning``), ``anp``, ``ibau``, ``ftsam``
(fine-tuning with adaptive sharpness-aware minimisation), ``sau`` (shared adversarial unlearning)."""

from lightning_backdoor.defenses.baselines.anp import ANP
from lightning_backdoor.defenses.baselines.fine_pruning import FinePruning
from lightning_backdoor.defenses.baselines.fine_tuning import FineTuning
from lightning_backdoor.defenses.baselines.ft_sam import FTSAM
from lightning_backdoor.defenses.baselines.ibau import IBAU
from lightning_backdoor.defenses.baselines.nad import NAD
from lightning_backdoor.defenses.baselines.neural_cleanse import NeuralCleanseUnlearning, Unlearning
from lightning_backdoor.defenses.baselines.sau import SAU

__all__ = ["ANP", "FTSAM", "IBAU", "NAD", "SAU", "FinePruning", "FineTuning", "NeuralCleanseUnlearning", "Unlearning"]
