"""``lightning-backdoor defend`` round trip through the real CLI entry point (bad input: test_bad_input.py)."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_backdoor.cli import main
from lightning_backdoor.io import state_digest

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
    assert report["defense"]["held_out_passes"] == "suffix"  # layer auto, λ chosen on U: through the shortcut
    assert report["environment"]["device"] == "cpu"  # the Trainer's (the quickstart's accelerator: cpu)
    assert report["after"]["asr"] < 0.5 * report["before"]["asr"]
    assert sha256(checkpoint) == digest
    # the report names the weights it defended, and digests them before and after as the written files hold them
    weights = report["weights"]
    assert weights["source"] == str(checkpoint.resolve())
    assert weights["sha256_before"] == state_digest(torch.load(checkpoint, weights_only=True)["state_dict"])
    assert weights["sha256_after"] == state_digest(load_file(tmp_path / "defended.safetensors"))
    assert weights["sha256_after"] != weights["sha256_before"]
    # the defended weights load back as plain tensors, and a second run writes new files
    defended = torch.load(tmp_path / "defended.ckpt", weights_only=True)["state_dict"]
    defend(f"--checkpoint={tmp_path / 'defended.safetensors'}", f"--output_dir={tmp_path}")
    again = json.loads((tmp_path / "defense_report-v1.json").read_text())["weights"]
    assert again["sha256_before"] == weights["sha256_after"]  # the chain of custody holds across runs
    assert (tmp_path / "defended-v1.ckpt").exists() and (tmp_path / "defense_report-v1.json").exists()
    assert torch.equal(torch.load(tmp_path / "defended.ckpt", weights_only=True)["state_dict"]["net.head.weight"],
                       defended["net.head.weight"])


def test_plain_network_state_dict_is_accepted(quickstart_run, tmp_path):
    state = torch.load(quickstart_run / "checkpoints" / "poisoned.ckpt", weights_only=True)["state_dict"]
    network = {key.removeprefix("net."): value.contiguous() for key, value in state.items() if key.startswith("net.")}
    save_file(network, tmp_path / "network.safetensors")
    # the run's own config.yaml, as `fit` saved it (with fit's `ckpt_path: null` and `weights_only: null`)
    main(["defend", "--config", str(quickstart_run / "config.yaml"), "--trainer.logger=false",
          f"--checkpoint={tmp_path / 'network.safetensors'}", f"--output_dir={tmp_path / 'out'}"])
    assert (tmp_path / "out" / "defense_report.json").exists()


def test_repair_without_target_class_images_says_so():
    from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
    from lightning_backdoor.models import build_model
    from lightning_backdoor.triggers import BadNets

    model = build_model("compact", num_classes=3, in_channels=1, widths=(8, 8, 8))
    unseen = UnseenData(torch.rand(4, 1, 16, 16), torch.tensor([1, 2, 1, 2]))
    with pytest.raises(ValueError, match="repair needs unseen images of the target class 0"):
        ActivationEditing(layer="head").defend(model, unseen, BackdoorKnowledge.of(BadNets(), target_class=0))


def test_defense_options_name_the_config_settings_they_drop(quickstart_run, tmp_path, capsys):
    """The quickstart's fit-end defense chooses λ on U (strength: null); ``--defense…`` options build the defense
    anew from its defaults, so a λ of 10 replaces it unless repeated: the console says so."""
    checkpoint = quickstart_run / "checkpoints" / "poisoned.ckpt"
    defend(f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'head'}", "--defense.init_args.layer=head")
    printed = capsys.readouterr().err  # a warning: on stderr, with the defense's progress lines
    assert ("defense: the --defense options replace the config's defense; not repeated, so back to the defaults: "
            "strength None -> 10.0") in printed
    assert "layer 'auto' -> 'head'" not in printed  # given on the command line
    defend(f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'both'}", "--defense.init_args.layer=head",
           "--defense.init_args.strength=null")
    assert "not repeated" not in capsys.readouterr().err


def test_defense_options_keep_the_configs_unseen_budget(quickstart_run, tmp_path):
    """A config whose DefenseCallback uses 5 of the data's 10 unseen images per class: ``--defense…`` options build
    another defense but keep that budget (a new user's mirror on/off comparison ran on 100 and then 500 images)."""
    import yaml

    config = yaml.safe_load((quickstart_run / "config.yaml").read_text())
    callback = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DefenseCallback"))
    callback.setdefault("init_args", {})["unseen_per_class"] = 5
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    checkpoint = quickstart_run / "checkpoints" / "poisoned.ckpt"
    for name, options in (("config", []), ("options", ["--defense.init_args.mirror=false"]),
                          ("given", ["--defense.init_args.mirror=false", "--unseen_per_class=3"])):
        main(["defend", "--config", str(path), "--trainer.logger=false", f"--checkpoint={checkpoint}",
              f"--output_dir={tmp_path / name}", *options])
    reports = {name: json.loads((tmp_path / name / "defense_report.json").read_text()) for name in
               ("config", "options", "given")}
    assert [reports[name]["defense"]["num_unseen"] for name in ("config", "options", "given")] == [50, 50, 30]
