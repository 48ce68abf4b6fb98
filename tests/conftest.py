"""Test settings: W&B offline with its files in a temporary folder, never a login prompt."""

from __future__ import annotations

import os
import tempfile

_WANDB_TMP = tempfile.mkdtemp(prefix="wandb-tests-")
os.environ.setdefault("WANDB_MODE", "offline")
for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
    os.environ.setdefault(variable, _WANDB_TMP)
os.environ.setdefault("WANDB_SILENT", "true")
