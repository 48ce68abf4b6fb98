"""Every bad input the CLI checks (the table in docs/bad-input.md, one row each) ends with one line on stderr naming the
problem, exit code 2, and no file created or changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_backdoor.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.yaml")
DATA = "--data.init_args"

#: (id, subcommand, arguments, expected message). ``{run}``: a fresh run folder, ``{tmp}``: the test's folder,
#: ``{ckpt}``: the quickstart run's checkpoint, ``{weights}``: its defended weights (safetensors: no settings to compare),
#: ``{empty_data}``: an ImageFolder tree without images.
CASES = [
    ("poison_rate_out_of_range", "fit", [f"{DATA}.poison_rate=1.5"], "poison_rate=1.5 is outside [0, 1]"),
    ("poison_rate_too_high", "fit", [f"{DATA}.poison_rate=0.95"], "non-target training images but only"),
    ("poison_rate_not_a_number", "fit", [f"{DATA}.poison_rate=abc"], "data.poison_rate: expected float"),
    ("target_class_not_a_class", "fit", [f"{DATA}.target_class=12"], "target_class=12 is not a class; valid: 0..9"),
    ("trigger_larger_than_image", "fit", [f"{DATA}.trigger.init_args.size=40"],
     "trigger size 40 is larger than the 28x28 image"),
    ("trigger_size_zero", "fit", [f"{DATA}.trigger.init_args.size=0"], "trigger size must be >= 1; got 0"),
    ("trigger_off_the_image", "fit", [f"{DATA}.trigger.init_args.position=[27,27]"],
     "trigger of size 3 at (row, col) = (27, 27) does not fit the 28x28 image"),
    ("unseen_per_class_too_many", "fit", [f"{DATA}.unseen_per_class=500"], "too few for unseen_per_class=500"),
    ("unseen_per_class_negative", "fit", [f"{DATA}.unseen_per_class=-3"], "unseen_per_class=-3 is negative"),
    ("data_folder_missing", "fit", [f"{DATA}.source=imagefolder", f"{DATA}.root={{tmp}}/nowhere"],
     "nowhere/train does not exist"),
    ("data_folder_empty", "fit", [f"{DATA}.source=imagefolder", f"{DATA}.root={{empty_data}}"], "holds no images"),
    ("data_folder_not_given", "fit", [f"{DATA}.source=imagefolder"], "source 'imagefolder' needs root="),
    ("unknown_source", "fit", [f"{DATA}.source=nope"], "unknown data source 'nope'; known sources: cifar10"),
    ("unknown_model", "fit", ["--model.init_args.model=nope"], "unknown model 'nope'; known models: compact"),
    ("model_class_not_importable", "fit", ["--model.init_args.model=nowhere.Net", f"{DATA}.cache_dir={{tmp}}/cache"],
     "cannot import model class 'nowhere.Net': No module named 'nowhere'"),
    ("residual_declaration_wrong", "fit", ["--model.init_args.model=callback_models.WronglyDeclaredResidualNet",
                                           "--model.init_args.model_kwargs={{}}"],
     "layer block.conv2: its block 'block' does not output an activation of the branch's output plus its skip term"),
    ("unknown_trigger", "fit", [f"{DATA}.trigger=lightning_backdoor.triggers.Nope"],
     "data.trigger: no class named 'Nope'; known: AdaptiveBlend, Additive, BadNets"),
    ("config_missing", "fit", ["--config={tmp}/none.yaml"], "File does not exist: '"),
    ("config_not_yaml", "fit", ["--config={tmp}/broken.yaml"],
     "Problems parsing config: while parsing a flow sequence in"),
    ("unknown_option", "fit", ["--trainer.max_epochz=3"], "unrecognized arguments: --trainer.max_epochz=3"),
    ("abbreviated_option", "fit", ["--trainer.max_epoch=3"], "unrecognized arguments: --trainer.max_epoch=3"),
    ("existing_run_folder", "fit", ["--trainer.default_root_dir={tmp}/old_run"], "already holds a run"),
    ("folder_holding_defense_outputs", "fit", ["--trainer.default_root_dir={tmp}/used"],
     "used already holds a run (defended.safetensors)"),
    ("all_to_all_with_target_class", "fit", [f"{DATA}.all_to_all=true", f"{DATA}.target_class=3"],
     "target_class=3 has no meaning with all_to_all=true (class y goes to (y + 1) mod 10)"),
    ("all_to_all_with_known_trigger_defense", "fit", [f"{DATA}.all_to_all=true"],
     "the defense with trigger_known=true removes an all-to-one backdoor (one target class)"),
    ("unwritable_run_folder", "fit", ["--trainer.default_root_dir=/sys/lightning-backdoor-run"], "is not writable"),
    ("run_folder_under_a_file", "fit", ["--trainer.default_root_dir={tmp}/old_run/config.yaml/run"],
     "cannot be created: "),
    ("weights_only_false", "test", ["--ckpt_path={ckpt}", "--weights_only=false"],
     "--weights_only=false would let a checkpoint run code"),
    ("ckpt_path_missing", "test", ["--ckpt_path={tmp}/none.ckpt"], "none.ckpt does not exist"),
    ("ckpt_path_last_truncated", "test", ["--trainer.default_root_dir={tmp}/truncated_run", "--ckpt_path=last"],
     "last.ckpt: not a plain tensor file (EOFError)"),
    ("ckpt_path_other_model", "test", ["--ckpt_path={ckpt}", "--model.init_args.model_kwargs.widths=[16,64,128]"],
     "was trained with model model_kwargs={'widths': [32, 64, 128]} but the config says"),
    ("checkpoint_missing", "defend", ["--checkpoint={tmp}/none.ckpt"], "none.ckpt does not exist"),
    ("checkpoint_not_given", "defend", [], "missing --checkpoint"),
    ("defend_known_trigger_not_named", "defend", ["--checkpoint={ckpt}", f"{DATA}.trigger=null"],
     "the data config names no trigger (data.init_args.trigger), so the defense cannot use it as known"),
    ("ckpt_path_in_defend", "defend", ["--checkpoint={ckpt}", "--ckpt_path={ckpt}"],
     "defend reads its weights from --checkpoint, not --ckpt_path"),
    ("checkpoint_model_mismatch", "defend", ["--checkpoint={weights}", "--model.init_args.model_kwargs.widths=[16,64,128]"],
     "first mismatching key 'net.blocks.0.conv1.weight'"),
    ("checkpoint_other_settings", "defend", ["--checkpoint={ckpt}", f"{DATA}.target_class=3"],
     "poisoned.ckpt was trained with data target_class=0 but the config says 3; pass the run's config"),
    ("unknown_layer", "defend", ["--checkpoint={ckpt}", "--defense.init_args.layer=blocks.7.conv"],
     "unknown layer 'blocks.7.conv'; editable layers: stem.conv"),
    ("unsupported_layer", "defend", ["--checkpoint={ckpt}", "--defense.init_args.layer=blocks.0.norm1"],
     "is a BatchNorm2d; supported: nn.Linear and nn.Conv2d"),
    ("batchnorm_prior_without_batchnorm", "defend",
     ["--checkpoint={ckpt}", "--defense.init_args.layer=stem.conv", "--defense.init_args.batchnorm_prior=0.5"],
     "batchnorm_prior needs a BatchNorm layer before the edited layer 'stem.conv'"),
    ("batchnorm_prior_auto", "defend", ["--checkpoint={ckpt}", "--defense.init_args.batchnorm_prior=auto"],
     "defense.batchnorm_prior: expected float, got 'auto'; where an option accepts None, write null"),
    ("batchnorm_prior_out_of_range", "defend", ["--checkpoint={ckpt}", "--defense.init_args.batchnorm_prior=2"],
     "batchnorm_prior=2.0 must be a weight in [0, 1] (0: no prior) or None/null (chosen on the unseen split)"),
    ("repair_weight_negative", "defend", ["--checkpoint={ckpt}", "--defense.init_args.repair_weights=[1, -4]"],
     "repair_weights=(1.0, -4.0) must be one or more numbers >= 0 (pin weights)"),
    ("unknown_defense", "defend", ["--checkpoint={ckpt}", "--defense=lightning_backdoor.defenses.Nope"],
     "defense: no class named 'Nope'; known: ANP, ActivationEditing, EstimateFirst"),
    ("unseen_per_class_zero", "defend", ["--checkpoint={ckpt}", "--unseen_per_class=0"],
     "got no unseen clean images; give a folder of your own"),
    ("checkpoint_not_a_torch_file", "defend", ["--checkpoint={tmp}/notes.json"],
     "notes.json: not a plain tensor file (not written by torch.save: Unsupported operand 123)"),
    ("defend_unseen_per_class_negative", "defend", ["--checkpoint={ckpt}", "--unseen_per_class=-1"],
     "unseen_per_class=-1 is negative or not an integer"),
    ("unseen_per_class_more_than_split", "defend", ["--checkpoint={ckpt}", "--unseen_per_class=11"],
     "asked for 11 unseen images per class but the split holds 10"),
    ("normalize_wrong_length", "defend", ["--checkpoint={ckpt}", "--model.init_args.normalize={{mean: [0.1, 0.2], std: [0.3, 0.3]}}"],
     "normalize.mean has 2 values but the model reads 1 channel"),
    ("normalize_zero_std", "defend", ["--checkpoint={ckpt}", "--model.init_args.normalize={{mean: [0.1], std: [0]}}"],
     "normalize.std must be positive"),
    ("unknown_timm_model", "fit", ["--model.init_args.model=timm:resnet181"],
     "unknown timm model 'resnet181'; close matches: resnet18"),
    ("class_path_not_a_module", "fit", ["--model.init_args.model=lightning_backdoor.models.build_model"],
     "model class 'lightning_backdoor.models.build_model' is not an nn.Module subclass"),
    ("unseen_root_other_classes", "defend", ["--checkpoint={ckpt}", "--unseen_root={tmp}/cats"], "'cat'"),
    ("unseen_root_no_images", "defend", ["--checkpoint={ckpt}", "--unseen_root={empty_data}/train"], "no images"),
    ("test_split_lacks_a_class", "fit", [f"{DATA}.source=imagefolder", f"{DATA}.root={{tmp}}/lacking_data"],
     "lacks class 'b' that"),
    ("unwritable_output_folder", "defend", ["--checkpoint={ckpt}", "--output_dir=/sys/lightning-backdoor-out"],
     "output folder /sys/lightning-backdoor-out is not writable"),
    ("accelerator_package_missing", "fit", ["--trainer.accelerator=tpu"],
     "trainer.accelerator: Requirement 'torch_xla"),
    ("option_misspelt", "fit", ["--trainer.max_epoch=3"],
     "unrecognized arguments: --trainer.max_epoch=3; did you mean --trainer.max_epochs?"),
    ("accelerator_not_on_this_machine", "fit", ["--trainer.accelerator=gpu"],
     "trainer.accelerator: No supported gpu backend found! (neither CUDA nor MPS); use --trainer.accelerator=auto"),
    ("model_option_set_from_data", "fit", ["--model.init_args.num_classes=5"],
     "model.init_args.num_classes is set from the data (its class count); remove the option"),
    ("model_option_set_from_data_in_config", "fit", ["--config={tmp}/linked.yaml"],
     "linked.yaml sets model.init_args.num_classes, which is set from the data (its class count); remove it"),
    ("cuda_not_on_this_machine", "defend", ["--checkpoint={ckpt}", "--trainer.accelerator=cuda"],
     "trainer.accelerator: CUDAAccelerator is not available on this machine; use --trainer.accelerator=auto or cpu"),
]


def command(subcommand: str, arguments: list[str], run: Path) -> list[str]:
    base = [subcommand, "--config", CONFIG, "--trainer.logger=false", f"--trainer.default_root_dir={run}"]
    if subcommand == "defend":
        base.append(f"--output_dir={run}")
    return base + arguments


def snapshot(*folders: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folders`` with its modification time and bytes (W&B's own offline files aside: its
    background service may still flush the fixture run's logs)."""
    return {str(path): (path.stat().st_mtime_ns, path.read_bytes()) for folder in folders
            for path in sorted(folder.rglob("*")) if path.is_file() and "wandb" not in path.relative_to(folder).parts}


@pytest.fixture()
def workspace(tmp_path: Path, quickstart_run: Path) -> dict[str, str]:
    (tmp_path / "old_run").mkdir()
    (tmp_path / "old_run" / "config.yaml").write_text("seed_everything: 0\n")
    (tmp_path / "broken.yaml").write_text("trainer: [unclosed\n")
    (tmp_path / "linked.yaml").write_text("model:\n  init_args:\n    num_classes: 5\n")
    (tmp_path / "notes.json").write_text('{"not": "weights"}\n')
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "defended.safetensors").write_bytes(b"not read: its name marks the folder as used")
    (tmp_path / "truncated_run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "truncated_run" / "checkpoints" / "last.ckpt").write_bytes(b"")  # a fit killed while saving
    for split in ("train", "test"):
        (tmp_path / "empty_data" / split / "cat").mkdir(parents=True)
    image = Image.new("L", (28, 28))
    for folder in ("cats/cat", "lacking_data/train/a", "lacking_data/train/b", "lacking_data/test/a"):
        (tmp_path / folder).mkdir(parents=True)
        image.save(tmp_path / folder / "0.png")
    return {"tmp": str(tmp_path), "empty_data": str(tmp_path / "empty_data"),
            "ckpt": str(quickstart_run / "checkpoints" / "poisoned.ckpt"),
            "weights": str(quickstart_run / "defended.safetensors")}


def check_one_line(err: str, message: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("lightning-backdoor: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert message in errors[0], errors[0]


@pytest.mark.parametrize("subcommand, arguments, message", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input(workspace, tmp_path, quickstart_run, capsys, subcommand, arguments, message):
    if "--trainer.accelerator=gpu" in arguments and (torch.cuda.is_available() or torch.backends.mps.is_available()):
        pytest.skip("this machine has a GPU: accelerator gpu is no bad input here")
    if "--trainer.accelerator=cuda" in arguments and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: accelerator cuda is no bad input here")
    run = tmp_path / "run"
    arguments = [argument.format(**workspace) for argument in arguments]
    before = snapshot(tmp_path, quickstart_run)
    with pytest.raises(SystemExit) as exit_info:
        main(command(subcommand, arguments, run))
    assert exit_info.value.code == 2
    check_one_line(capsys.readouterr().err, message)
    assert not run.exists()
    assert snapshot(tmp_path, quickstart_run) == before


@pytest.mark.parametrize("case", ["unknown_trigger", "unknown_layer"])
def test_bad_input_through_the_console_script(workspace, tmp_path, case):
    """A real process: stderr ends with our one line, no traceback, exit code 2: a refusal while parsing and one
    after the model is built (a value refused after parsing: tests/test_cli_output.py's poison_rate=1.5)."""
    _, subcommand, arguments, message = next(row for row in CASES if row[0] == case)
    arguments = [argument.format(**workspace) for argument in arguments]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "lightning_backdoor.cli",
                             *command(subcommand, arguments, tmp_path / "run")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    check_one_line(result.stderr, message)
    assert not (tmp_path / "run").exists()


def test_a_fit_its_defense_callback_refuses_writes_no_wandb_run(tmp_path):
    """Lightning creates its loggers' runs (W&B's, offline here) before any callback's ``setup``; the command line
    runs the DefenseCallback's checks before the Trainer starts, so a refusal there leaves no run folder, W&B
    files included (with the check only in ``setup``, ``RUN/wandb/`` was written)."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, f"--trainer.default_root_dir={run}", f"{DATA}.all_to_all=true"])
    assert exit_info.value.code == 2
    assert not run.exists()


def test_the_docs_table_lists_every_case():
    table = (ROOT / "docs" / "bad-input.md").read_text()
    missing = [case[0] for case in CASES if f"`{case[0]}`" not in table]
    assert not missing, f"docs/bad-input.md's bad-input table lacks {missing}"
    assert f"({len(CASES)} cases," in table, "docs/bad-input.md's case count is not len(CASES)"


def test_a_missing_checkpoint_is_refused_before_any_data_is_decoded(tmp_path, monkeypatch, capsys):
    """``defend`` checks ``--checkpoint`` before the data module is built: a CIFAR-10 config would otherwise decode
    the data set, and write its cache, before saying the file is not there."""
    import functools

    from lightning_backdoor.data import PoisonedDataModule
    built = []
    original = PoisonedDataModule.__init__

    @functools.wraps(original)
    def recorded(self, *args, **kwargs):
        built.append(True)
        original(self, *args, **kwargs)

    monkeypatch.setattr(PoisonedDataModule, "__init__", recorded)
    for missing in (tmp_path / "none.ckpt", tmp_path):  # no file; a folder
        with pytest.raises(SystemExit) as exit_info:
            main(command("defend", [f"--checkpoint={missing}"], tmp_path / "run"))
        assert exit_info.value.code == 2
        check_one_line(capsys.readouterr().err, "does not exist" if missing != tmp_path else "is a folder")
    assert not built


@pytest.mark.parametrize("subcommand", ["defend", "test"])
def test_no_config_says_to_give_one(tmp_path, capsys, subcommand):
    """Without ``--config`` the model and data are missing: the line says so and names the option that gives them."""
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, f"--checkpoint={tmp_path / 'none.ckpt'}"] if subcommand == "defend" else [subcommand])
    assert exit_info.value.code == 2
    check_one_line(capsys.readouterr().err, "missing --data, --model; no --config given: describe the run with one")
    assert list(tmp_path.iterdir()) == []
