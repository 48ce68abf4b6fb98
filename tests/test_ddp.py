"""Fit + defense under 2-process CPU DDP (gloo) through the real CLI: the report matches one process, and every rank
ends holding the defended weights that were saved.

Two comparisons, each with a tolerance counted in test images (the quickstart's test split has 100 images per
class: one image is 0.1 pt of CA, 0.11 pt of ASR, ASR floor and RA over the 900 non-target images, and 1 pt of
target-class accuracy). A float rounding difference can flip a few images near the decision boundary, so neither
comparison may ask for equal figures.

1. The defense itself is the single-process defense: defending the DDP-trained checkpoint in one process gives the
   same report within 3 images per metric. Same weights, same algorithm and, read from the run's environment.json,
   rank 0's thread count (measured: identical); another library build could still round differently.
2. The training is the single-process training split over the ranks: with ``sync_batchnorm`` (GlooSyncBatchNorm on
   CPU) the two ranks see the single process's batches, crops and batch statistics (tests/test_sync_training.py), so
   the runs differ by float rounding only; over 8 epochs that drifts like two machines' runs of one config. Measured:
   the 2-process run 2 images of CA from the 1-process one; a 1-process run with 1 thread instead of 2 had CA 98.8 %
   instead of 98.3 % (5 images), another machine's 98.6 %, and seed 1 98.9 %. So the DDP run must be the same
   quality: within 15 images per metric of the single process (TA within 5), and the quickstart's own guarantees
   must hold for it (backdoor learnt, then removed down to its floor). That DDP computes exactly what one process
   does is proved in float64 by tests/test_sync_training.py, not by these figures.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_backdoor.cli import main
from lightning_backdoor.evaluation import METRIC_NAMES
from lightning_backdoor.io import state_digest

ROOT = Path(__file__).resolve().parents[1]
#: test images per metric's denominator on the quickstart's test split (100 per class, target class 0)
DENOMINATORS = {"clean_acc": 1000, "asr": 900, "asr_floor": 900, "robust_acc": 900, "target_acc": 100}
#: same weights, another thread count: a few boundary images may flip
SAME_WEIGHTS_IMAGES = 3
#: another run of the same training (float rounding drift): 15 images (1.5 pt of CA; 3 runs measured 6 images apart)
RETRAINED_IMAGES = {"clean_acc": 15, "asr": 15, "asr_floor": 15, "robust_acc": 15, "target_acc": 5}


def close(a: float, b: float, name: str, images: int) -> bool:
    """``a`` and ``b`` (fractions) at most ``images`` test images apart (half an image of slack for float error)."""
    return abs(a - b) <= (images + 0.5) / DENOMINATORS[name]


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
    # rank 0 recorded its stack (Lightning gives each rank cores // 2 threads, or the OMP_NUM_THREADS it inherits):
    # defend with as many, so that the float sums run in the same order as on rank 0
    threads = json.loads((root / "environment.json").read_text())["torch_threads"]
    own_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        main(["defend", "--config", "configs/quickstart.yaml", f"--checkpoint={root / 'checkpoints' / 'poisoned.ckpt'}",
              "--defense.init_args.layer=auto", "--defense.init_args.strength=null",  # the config's DefenseCallback's
              f"--output_dir={tmp_path / 'one-process-defense'}"])
    finally:
        torch.set_num_threads(own_threads)
    one_process_defense = json.loads((tmp_path / "one-process-defense" / "defense_report.json").read_text())
    single = json.loads((quickstart_run / "defense_report.json").read_text())
    for stage in ("before", "after_edit", "after"):
        for name in METRIC_NAMES:
            assert close(ddp[stage][name], one_process_defense[stage][name], name, SAME_WEIGHTS_IMAGES), (
                stage, name, ddp[stage], one_process_defense[stage])
            assert close(ddp[stage][name], single[stage][name], name, RETRAINED_IMAGES[name]), (
                stage, name, ddp[stage], single[stage])
    # DER = (ASR drop - CA drop + 1) / 2: half the sum of the ASR and CA tolerances
    assert abs(ddp["der"] - single["der"]) <= (15.5 / 900 + 15.5 / 1000) / 2
    # the quickstart's guarantees (tests/test_quickstart.py) hold for the DDP-trained run too
    before, after = ddp["before"], ddp["after"]
    assert before["asr"] >= 0.9 and after["asr"] <= after["asr_floor"] + 0.02, (before, after)
    assert after["clean_acc"] >= before["clean_acc"] - 0.01, (before, after)

    agreed = re.findall(r"defense: all (\d+) processes' defended weights: sha256 ([0-9a-f]{64})", printed)
    assert len(agreed) == 1 and agreed[0][0] == "2", printed[-4000:]  # rank 0 compared all ranks' digests
    assert agreed[0][1] == state_digest(load_file(ddp["safetensors"])) == ddp["weights"]["sha256_after"]
