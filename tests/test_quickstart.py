"""Integration: the quickstart really learns the backdoor on the bundled MNIST digits, then removes it."""

import json

import pytest
import torch

from lightning_backdoor.cli import main


def test_quickstart_learns_the_backdoor_and_the_task(quickstart_run, tmp_path, capsys):
    checkpoint = quickstart_run / "checkpoints" / "poisoned.ckpt"  # the shared run is only read
    main(["test", "--config", "configs/quickstart.yaml", f"--trainer.default_root_dir={tmp_path}",
          f"--ckpt_path={checkpoint}", "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    printed = capsys.readouterr().out
    values = {line.split()[0]: float(line.split()[1]) for line in printed.splitlines()
              if line.strip().startswith("test/") and len(line.split()) == 2}
    assert values["test/asr"] >= 0.9, values
    assert values["test/clean_acc"] >= 0.8, values
    assert values["test/asr_floor"] <= 0.05, values


def test_quickstart_run_saves_split_indices_and_a_code_free_checkpoint(quickstart_run):
    splits = json.loads((quickstart_run / "splits.json").read_text())
    assert len(splits["unseen"]) == 100 and len(splits["poisoned"]) > 0
    assert not set(splits["unseen"]) & set(splits["train"])
    checkpoint = torch.load(quickstart_run / "checkpoints" / "poisoned.ckpt", weights_only=True)
    assert torch.equal(checkpoint["PoisonedDataModule"]["unseen"], torch.tensor(splits["unseen"]))
    assert any(key.startswith("net.") for key in checkpoint["state_dict"])


def test_quickstart_defense_removes_the_backdoor_and_keeps_accuracy(quickstart_run):
    report = json.loads((quickstart_run / "defense_report.json").read_text())
    before, after = report["before"], report["after"]
    assert before["asr"] >= 0.9, before
    assert after["asr"] <= after["asr_floor"] + 0.02, after
    assert after["clean_acc"] >= before["clean_acc"] - 0.01, (before, after)
    # 5 of the target class's 100 test images: rounding flips a few boundary images (three CPU-trained models of
    # this config lost 0, 0 and 1 image)
    assert after["target_acc"] >= before["target_acc"] - 0.05, (before, after)
    assert 0.5 < report["der"] <= 1.0
    assert report["defense"]["num_unseen"] == 100 and report["defense"]["seconds"] > 0
    defended = torch.load(report["checkpoint"], weights_only=True)["state_dict"]
    poisoned = torch.load(quickstart_run / "checkpoints" / "poisoned.ckpt", weights_only=True)["state_dict"]
    changed = [key for key in poisoned if not torch.equal(poisoned[key], defended[key])]
    assert changed == [f"net.{report['defense']['layer']}.weight"]
