"""``lightning-backdoor defend`` round trip and its one-line errors, through the real CLI entry point."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from lightning_backdoor.cli import main

CONFIG = "configs/quickstart.yaml"


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def defend(*args):
    main(["defend", "--config", CONFIG, "--trainer.logger=false", *args])


def test_defend_round_trip_keeps_the_original_and_never_overwrites(quickstart_run, tmp_path, capsys):
    checkpoint = quickstart_run / "checkpoints" / "poisoned.ckpt"
    digest = sha256(checkpoint)
    defend(f"--checkpoint={checkpoint}", f"--output_dir={tmp_path}", "--unseen_per_class=5")
    printed = capsys.readouterr().out
    assert f"defense report: {tmp_path / 'defense_report.json'}" in printed
    report = json.loads((tmp_path / "defense_report.json").read_text())
    assert set(report) >= {"before", "after_edit", "after", "defense", "der"}
    for stage in ("before", "after_edit", "after"):
        assert set(report[stage]) >= {"clean_acc", "asr", "asr_floor", "robust_acc", "target_acc"}
        assert all(0.0 <= report[stage][name] <= 1.0 for name in ("clean_acc", "asr", "robust_acc"))
    assert report["defense"]["num_unseen"] == 50
    assert report["after"]["asr"] < 0.5 * report["before"]["asr"]
    assert sha256(checkpoint) == digest
    # the defended weights load back as plain tensors, and a second run writes new files
    defended = torch.load(tmp_path / "defended.ckpt", weights_only=True)["state_dict"]
    defend(f"--checkpoint={tmp_path / 'defended.safetensors'}", f"--output_dir={tmp_path}")
    assert (tmp_path / "defended-v1.ckpt").exists() and (tmp_path / "defense_report-v1.json").exists()
    assert torch.equal(torch.load(tmp_path / "defended.ckpt", weights_only=True)["state_dict"]["net.head.weight"],
                       defended["net.head.weight"])


def test_plain_network_state_dict_is_accepted(quickstart_run, tmp_path):
    state = torch.load(quickstart_run / "checkpoints" / "poisoned.ckpt", weights_only=True)["state_dict"]
    network = {key.removeprefix("net."): value.contiguous() for key, value in state.items() if key.startswith("net.")}
    save_file(network, tmp_path / "network.safetensors")
    defend(f"--checkpoint={tmp_path / 'network.safetensors'}", f"--output_dir={tmp_path / 'out'}")
    assert (tmp_path / "out" / "defense_report.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--defense.init_args.layer=blocks.7.conv"], "unknown layer 'blocks.7.conv'; editable layers: stem.conv"),
    (["--defense.init_args.layer=blocks.0.norm1"], "is a BatchNorm2d; supported: nn.Linear and nn.Conv2d"),
    (["--model.init_args.model_kwargs.widths=[16,64,128]"], "first mismatching key 'net.blocks.0.conv1.weight'"),
    (["--unseen_per_class=0"], "got no unseen clean images; use unseen_per_class >= 1"),
    (["--unseen_per_class=11"], "asked for 11 unseen images per class but the split holds 10"),
])
def test_bad_defend_input_is_one_line_exit_2_and_writes_nothing(quickstart_run, tmp_path, capsys, args, message):
    checkpoint = quickstart_run / "checkpoints" / "poisoned.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        defend(f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}", *args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lightning-backdoor: error:") and message in error
    assert not any((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_missing_checkpoint_and_crafted_pickle_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": Exploit()}, crafted)
    for path, message in ((tmp_path / "none.ckpt", "does not exist"), (crafted, "refusing to load")):
        with pytest.raises(SystemExit):
            defend(f"--checkpoint={path}", f"--output_dir={tmp_path / 'out'}")
        assert message in capsys.readouterr().err
    assert not marker.exists()


def test_repair_without_target_class_images_says_so():
    from lightning_backdoor.defenses import ActivationEditing, UnseenData
    from lightning_backdoor.models import build_model
    from lightning_backdoor.triggers import BadNets

    model = build_model("compact", num_classes=3, in_channels=1, widths=(8, 8, 8))
    unseen = UnseenData(torch.rand(4, 1, 16, 16), torch.tensor([1, 2, 1, 2]))
    with pytest.raises(ValueError, match="repair needs unseen images of the target class 0"):
        ActivationEditing(layer="head").defend(model, unseen, BadNets(), target_class=0)
