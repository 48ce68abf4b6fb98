"""Defenses: activation-guided editing with repair (ours) and the field's baselines, each a :class:`Defense`
registered by name in ``DEFENSES``; ``EstimateFirst`` runs any of them without backdoor knowledge;
``run_defense`` evaluates one before and after."""

from lightning_backdoor.defenses.activation_editing import ActivationEditing
from lightning_backdoor.defenses.base import (DEFENSES, BackdoorKnowledge, Defense, DefenseResult, UnseenData,
                                              build_defense)
from lightning_backdoor.defenses.baselines import (ANP, FTSAM, IBAU, NAD, SAU, FinePruning, FineTuning,
                                                   NeuralCleanseUnlearning, Unlearning)
from lightning_backdoor.defenses.estimate_first import EstimateFirst, without_knowledge
from lightning_backdoor.defenses.estimation import TriggerEstimator
from lightning_backdoor.defenses.report import DefenseReport, TestData, run_defense

__all__ = ["ANP", "DEFENSES", "FTSAM", "IBAU", "NAD", "SAU", "ActivationEditing", "BackdoorKnowledge", "Defense", "DefenseReport",
           "DefenseResult", "EstimateFirst", "FinePruning", "FineTuning", "NeuralCleanseUnlearning", "TestData",
           "TriggerEstimator", "Unlearning", "UnseenData", "build_defense", "run_defense", "without_knowledge"]
