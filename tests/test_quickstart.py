"""Integration: the quickstart really learns the backdoor on the bundled MNIST digits, through the real CLI."""

import json

import pytest
import torch

from lightning_backdoor.cli import main


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """Fit the quickstart config on a reduced budget (5 epochs); shared by the tests that need a trained model."""
    root = tmp_path_factory.mktemp("quickstart")
    main(["fit", "--config", "configs/quickstart.yaml", f"--trainer.default_root_dir={root}",
          "--trainer.max_epochs=5", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    return root


def test_quickstart_learns_the_backdoor_and_the_task(quickstart_run, capsys):
    checkpoint = quickstart_run / "checkpoints" / "poisoned.ckpt"
    main(["test", "--config", "configs/quickstart.yaml", f"--trainer.default_root_dir={quickstart_run}/test",
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
