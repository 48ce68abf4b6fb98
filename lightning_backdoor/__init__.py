"""lightning-backdoor: train backdoored image classifiers and remove their backdoors by activation-guided editing."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Lazy exports, so ``import lightning_backdoor.triggers`` does not pay for importing Lightning.
_EXPORTS = {
    "PoisonedClassifier": "lightning_backdoor.classifier",
    "PoisonedDataModule": "lightning_backdoor.data.datamodule",
    "DefenseCallback": "lightning_backdoor.defenses.callback",
    "WandbDefenseReport": "lightning_backdoor.dashboard",
    "WandbSamples": "lightning_backdoor.dashboard",
    "SyncBatchNormPlugin": "lightning_backdoor.models.sync_batchnorm",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_backdoor' has no attribute {name!r}")
