"""DefenseCallback at setup: what would fail the defense after training is refused before the first training step,
in one line, with nothing written; what it can adapt to (tuple/dict outputs, any precision) is defended correctly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from callback_models import (MEAN, STD, CountSteps, UserClassifier, digits, normalise, quiet_trainer, trained)
from torch.utils.data import DataLoader, TensorDataset

from lightning_backdoor import DefenseCallback, PoisonedDataModule
from lightning_backdoor.defenses import ActivationEditing
from lightning_backdoor.models.input_transform import InputTransform
from lightning_backdoor.triggers import BadNets

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ROOT = Path(__file__).resolve().parents[1]

class PlainDigits(L.LightningDataModule):
    """A data module that is no PoisonedDataModule: training and test loaders of pixels, nothing held back."""

    def __init__(self, test: bool = True) -> None:
        super().__init__()
        data = digits()
        images, labels = data.train_pool.images.float() / 255, data.train_pool.labels
        self.train = TensorDataset(images, labels)
        if test:
            self.test_dataloader = lambda: DataLoader(TensorDataset(*data.test_dataset().tensors[:2]), 500)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=64)


def unseen_loader(normalised: bool = False) -> DataLoader:
    """The digits' 100 unseen images (pixels, or normalised with MEAN/STD) and labels."""
    unseen = digits().unseen_set()
    images = unseen.images.float() / 255
    return DataLoader(TensorDataset(normalise(images) if normalised else images, unseen.labels), batch_size=50)


def with_transform() -> UserClassifier:
    """A user's module that normalises inside (an InputTransform on itself, as PoisonedClassifier's net has)."""
    module = UserClassifier()
    InputTransform(MEAN, STD).attach(module)
    return module


# (id, module, data module, callback arguments, the one-line error)
REFUSED: list[tuple[str, Any, Any, dict[str, Any], str]] = [
    ("more unseen per class than held back", UserClassifier, digits, {"unseen_per_class": 11},
     r"^asked for 11 unseen images per class but the split holds 10$"),
    ("no unseen data source", UserClassifier, PlainDigits, {"trigger": BadNets(size=3), "target_class": 0},
     r"^DefenseCallback needs unseen clean data: use a PoisonedDataModule or pass unseen_dataloader=$"),
    ("no test data source", UserClassifier, lambda: PlainDigits(test=False),
     {"unseen_dataloader": unseen_loader(), "trigger": BadNets(size=3), "target_class": 0},
     r"^DefenseCallback needs clean test data .* pass test_dataloader=$"),
    ("a string, not logits", lambda: UserClassifier("string"), digits, {},
     r"^the model returns a str; the defense reads logits \(N, K\)"),
    ("a dict without logits", lambda: UserClassifier("no_logits"), digits, {},
     r"^the model returns a dict with keys \['scores'\]; the defense reads logits"),
    ("logits of one dimension", lambda: UserClassifier("flat"), digits, {},
     r"^the model returns logits of shape \(20,\) for 2 images; the defense reads \(N, K\)"),
    ("11 logits for 10 classes", lambda: UserClassifier("wide"), digits, {},
     r"^the model returns 11 logits per image but the data has 10 classes$"),
    ("a model for 3 channels on grey images", lambda: UserClassifier(in_channels=3), digits, {},
     r"^the model fails on 2 unseen images of shape \(1, 8, 8\): "),
    ("normalised unseen images without normalize", UserClassifier, digits,
     {"unseen_dataloader": unseen_loader(normalised=True)},
     r"^the unseen images range over \[-1\.88, 2\.09\], not pixels in \[0, 1\]: pass un-normalised images, or "
     r"normalize="),
    ("normalize for 3 channels, images of 1", UserClassifier, digits,
     {"normalize": {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}},
     r"^normalize.mean has 3 values but the model reads 1 channel$"),
    ("normalize unlike the model's own", with_transform, digits, {"normalize": {"mean": [0.5], "std": [0.25]}},
     r"^normalize/input_size .* differ from the model's own input transform"),
    ("a trigger without a target class", UserClassifier, PlainDigits,
     {"unseen_dataloader": unseen_loader(), "trigger": BadNets(size=3)},
     r"^the defense got a trigger but no target_class: pass target_class=, or trigger_known=false"),
]


@pytest.mark.parametrize(("module", "data", "arguments", "error"), [case[1:] for case in REFUSED],
                         ids=[case[0] for case in REFUSED])
def test_refused_at_setup_before_any_training_step(module, data, arguments, error, tmp_path: Path) -> None:
    model = module()
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    counter = CountSteps()
    callback = DefenseCallback(defense=ActivationEditing(layer="fc"), **arguments)
    trainer = quiet_trainer(tmp_path, [counter, callback], max_epochs=1, enable_checkpointing=True)
    with pytest.raises(ValueError, match=error):
        trainer.fit(model, datamodule=data())
    assert counter.steps == 0
    assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())
    # nothing at all: no checkpoint, no defense output, and no run records (written when training starts)
    assert not any(path.is_file() for path in tmp_path.rglob("*")), sorted(tmp_path.rglob("*"))


def test_the_cli_refuses_at_setup_with_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    from lightning_backdoor.cli import main

    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    defense = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DefenseCallback"))
    defense["init_args"]["unseen_per_class"] = 11  # the data module holds 10 per class
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "config.yaml"), f"--trainer.default_root_dir={root}",
              "--trainer.logger=false"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == "lightning-backdoor: error: asked for 11 unseen images per class but the split holds 10"
    assert not list(root.rglob("*.ckpt")) and not list(root.rglob("defense_report*"))


# --- adapted, not refused ----------------------------------------------------------------------------------------

def defend_with_one_step(model: UserClassifier, tmp_path: Path, data: PoisonedDataModule | None = None,
                         **trainer_arguments: Any) -> dict[str, Any]:
    """Fit ``model`` (lr 0: its weights stay) one step so that the callback defends it at the end; the report."""
    callback = DefenseCallback(defense=ActivationEditing(layer="fc"))
    quiet_trainer(tmp_path, [callback], max_steps=1, **trainer_arguments).fit(model, datamodule=data or digits())
    return callback.report.to_json()


@pytest.mark.parametrize("output", ["tensor", "tuple", "list", "dict"])
def test_outputs_holding_logits_are_defended(output: str, tmp_path: Path) -> None:
    model = trained(output)
    report = defend_with_one_step(model, tmp_path)
    before, after = report["before"], report["after"]
    # the digits model learnt the backdoor (97 % ASR, 93-97 % CA on 300 test images); the edit removes it: a
    # quarter of the ASR leaves room for 20 points of run-to-run variation; CA within 3 points (9 images)
    assert before["asr"] >= 0.8 and after["asr"] <= before["asr"] / 4, (before, after)
    assert after["clean_acc"] >= before["clean_acc"] - 0.03, (before, after)
    # the logits hook is gone: the module returns what it returned before
    returned = model(torch.rand(2, 1, 8, 8))
    assert type(returned) is {"tensor": torch.Tensor, "tuple": tuple, "list": list, "dict": dict}[output]


PRECISIONS = {"32-true": torch.float32, "64-true": torch.float64, "16-true": torch.float16,
              "bf16-true": torch.bfloat16, "bf16-mixed": torch.float32, "16-mixed": torch.float32}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_every_precision_is_defended_in_float32_and_stored_back(precision: str, tmp_path: Path) -> None:
    model = trained()
    report = defend_with_one_step(model, tmp_path, precision=precision)
    before, after = report["before"], report["after"]
    # before the fix, true half/double precision failed after training ("Input type (float) and bias type
    # (c10::BFloat16) should be the same"); now the defense computes in float32: ASR falls as in float32 (margins as
    # above; a 16-bit rounding of the weights moves a few of 300 images at most)
    assert before["asr"] >= 0.8 and after["asr"] <= before["asr"] / 4, (before, after)
    assert after["clean_acc"] >= before["clean_acc"] - 0.03, (before, after)
    # the weights go back to the precision's dtype, the saved ones too
    assert {parameter.dtype for parameter in model.parameters()} == {PRECISIONS[precision]}
    saved = torch.load(tmp_path / "defended.ckpt", weights_only=True)["state_dict"]
    assert saved["fc.weight"].dtype == PRECISIONS[precision]
    assert torch.equal(saved["fc.weight"], model.fc.weight.detach())
