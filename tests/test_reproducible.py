"""Reproducibility on CPU: a seed fixes the poisoned and unseen indices and the poisoned training set, and two
``defend`` runs with the same settings write bit-identical weights; another seed gives other indices and weights.
Bit-identical holds on one software stack and thread count only, so every run folder records them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_backdoor.cli import main
from lightning_backdoor.data import PoisonedDataModule
from lightning_backdoor.provenance import environment, git_commit
from lightning_backdoor.triggers import WaNet

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.yaml")


def test_seed_fixes_the_splits_and_the_poisoned_images():
    first, second, other = (PoisonedDataModule(trigger=WaNet(), unseen_per_class=5, seed=seed) for seed in (3, 3, 4))
    for name, indices in first.plan.as_dict().items():
        assert torch.equal(indices, second.plan.as_dict()[name]), name
    assert not torch.equal(first.plan.poisoned, other.plan.poisoned)
    assert not torch.equal(first.plan.unseen, other.plan.unseen)
    first.setup("fit")
    second.setup("fit")
    for a, b in zip(first.train_dataloader().dataset.tensors, second.train_dataloader().dataset.tensors):
        assert torch.equal(a, b)  # triggered images and WaNet's noise-mode images included


def defend_args(checkpoint: Path, output_dir: Path, *extra: str) -> list[str]:
    # 3 images per class, fewer than min_images: the seeded augmented views take part
    return ["defend", "--config", CONFIG, "--trainer.logger=false", f"--checkpoint={checkpoint}",
            f"--output_dir={output_dir}", "--unseen_per_class=3", "--defense.init_args.layer=blocks.2.conv1",
            "--defense.init_args.strength=1.0", *extra]


def test_two_defend_runs_write_bit_identical_weights(quickstart_run, tmp_path):
    checkpoint = quickstart_run / "checkpoints" / "poisoned.ckpt"
    main(defend_args(checkpoint, tmp_path / "a"))
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # the second run in a fresh process: no shared state
    subprocess.run([sys.executable, "-m", "lightning_backdoor.cli", *defend_args(checkpoint, tmp_path / "b")],
                   env=env, check=True, capture_output=True, timeout=600)
    main(defend_args(checkpoint, tmp_path / "c", "--defense.init_args.seed=1"))
    a, b, c = (load_file(tmp_path / run / "defended.safetensors") for run in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert (tmp_path / "a" / "defended.safetensors").read_bytes() == (tmp_path / "b" / "defended.safetensors").read_bytes()
    reports = [json.loads((tmp_path / run / "defense_report.json").read_text()) for run in "ab"]
    assert reports[0]["after"] == reports[1]["after"]
    assert any(not torch.equal(a[key], c[key]) for key in a)


def test_environment_names_the_stack_and_thread_count():
    record = environment()
    json.dumps(record)  # JSON-ready
    assert record["packages"]["torch"] == torch.__version__  # with its build tag (+cpu, +cu130)
    assert {"torchvision", "lightning", "torchmetrics", "timm", "lightning-backdoor"} <= set(record["packages"])
    assert record["torch_threads"] == torch.get_num_threads() >= 1
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    git = record["git"]
    assert git is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))


def test_fit_writes_its_environment_next_to_its_config(quickstart_run):
    assert (quickstart_run / "config.yaml").is_file()
    recorded = json.loads((quickstart_run / "environment.json").read_text())
    assert recorded["packages"] == environment()["packages"] and recorded["torch_threads"] >= 1
    # the quickstart config says bf16-mixed: it runs so only where the CPU computes bfloat16 natively
    assert recorded["trainer_precision"] == ("bf16-mixed" if recorded["native_bf16"] else "32-true")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_that_of_the_checkout_holding_the_package(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    (tmp_path / "package" / "inner").mkdir(parents=True)
    (tmp_path / "package" / "module.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    found = git_commit(tmp_path / "package")
    assert found is not None and len(found["commit"]) == 40 and found["dirty"] is False
    (tmp_path / "package" / "module.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "package")["dirty"] is True
    assert git_commit(tmp_path / "package" / "inner") is None  # a copy inside another project's repository
