"""Fit + defense under 2-process CPU DDP (gloo) through the real CLI: the report matches one process, and every rank
ends holding the defended weights that were saved.

Two comparisons. The defense itself must be the single-process defense: defending the DDP-trained checkpoint in one
process gives the same report within 0.5 pt on every metric. The training must match the single-process quickstart
within 0.5 pt on every metric: with ``sync_batchnorm`` (GlooSyncBatchNorm on CPU) the two ranks see the single
process's batches, crops and batch statistics (tests/test_sync_training.py), so the runs differ by bf16 rounding only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from lightning_backdoor.cli import main
from lightning_backdoor.evaluation import METRIC_NAMES
from lightning_backdoor.io import state_digest

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.005  # 0.5 percentage points


def test_two_process_ddp_fit_and_defense_match_one_process(quickstart_run, tmp_path):
    root = tmp_path / "ddp"
    # Lightning's ddp strategy re-launches this same command once per extra rank, so it must be a real command;
    # per-device batch 64 on 2 ranks keeps the quickstart's effective batch of 128 and its number of steps.
    command = [sys.executable, "-m", "lightning_backdoor.cli", "fit", "--config", "configs/quickstart.yaml",
               f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu", "--trainer.devices=2",
               "--trainer.strategy=ddp", "--trainer.sync_batchnorm=true", "--data.init_args.batch_size=64",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-4000:]

    ddp = json.loads((root / "defense_report.json").read_text())
    main(["defend", "--config", "configs/quickstart.yaml", f"--checkpoint={root / 'checkpoints' / 'poisoned.ckpt'}",
          "--defense.init_args.layer=auto", "--defense.init_args.strength=null",  # the config's DefenseCallback's
          f"--output_dir={tmp_path / 'one-process-defense'}"])
    one_process_defense = json.loads((tmp_path / "one-process-defense" / "defense_report.json").read_text())
    single = json.loads((quickstart_run / "defense_report.json").read_text())
    for stage in ("before", "after_edit", "after"):
        for name in METRIC_NAMES:
            assert abs(ddp[stage][name] - one_process_defense[stage][name]) <= TOLERANCE, (stage, name)
            assert abs(ddp[stage][name] - single[stage][name]) <= TOLERANCE, (stage, name, ddp[stage], single[stage])
    assert abs(ddp["der"] - single["der"]) <= TOLERANCE

    agreed = re.findall(r"defense: (\d+) process\(es\) hold the defended weights, sha256 ([0-9a-f]{64})", printed)
    assert len(agreed) == 1 and agreed[0][0] == "2", printed[-4000:]  # rank 0 compared all ranks' digests
    assert agreed[0][1] == state_digest(load_file(ddp["safetensors"]))
