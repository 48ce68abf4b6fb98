"""A checkpoint's numbers mean something only with the settings it was trained with: every command that reads one
(``test``/``validate``/``predict``/``fit --ckpt_path``, ``defend --checkpoint``) compares the data settings and model
hyperparameters with the config and names the first that differs, in one line, exit code 2, nothing written. A
weights-only checkpoint (``defended.ckpt``) given to ``fit`` starts a new fit from its weights."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from lightning_backdoor.classifier import PoisonedClassifier
from lightning_backdoor.cli import main
from lightning_backdoor.data import PoisonedDataModule
from lightning_backdoor.io import load_tensors
from lightning_backdoor.runs import instantiate_run

ROOT = Path(__file__).resolve().parents[1]
DATA = "--data.init_args"
BADNETS = "BadNets(seed=0, size=3, position='bottom_right', value=1.0, margin=0)"
#: the quickstart's data settings as the checkpoint stores them
QUICKSTART_SETTINGS = {"source": "mnist5k", "classes": [str(digit) for digit in range(10)], "target_class": 0,
                       "poison_rate": 0.1, "all_to_all": False, "clean_label": False, "trigger": BADNETS, "seed": 0,
                       "unseen_per_class": 10}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """The quickstart config trained for one step (no defense, no logger): (config file, its checkpoint)."""
    folder = tmp_path_factory.mktemp("tiny")
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update(logger=False, max_steps=1, limit_val_batches=0, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[{
                                 "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                 "init_args": {"filename": "poisoned", "save_last": False}}])
    config_path = folder / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(config_path), f"--trainer.default_root_dir={folder / 'run'}"])
    return config_path, folder / "run" / "checkpoints" / "poisoned.ckpt"


def edited(checkpoint: Path, folder: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of ``checkpoint`` in ``folder`` with ``edit`` applied (plain tensors and values only)."""
    record = load_tensors(checkpoint)
    edit(record)
    path = folder / "edited.ckpt"
    torch.save(record, path)
    return path


def data_setting(name: str, value: object) -> Callable[[dict], None]:
    def edit(record: dict) -> None:
        record["PoisonedDataModule"]["settings"][name] = value
    return edit


def model_hparam(name: str, value: object) -> Callable[[dict], None]:
    def edit(record: dict) -> None:
        record["hyper_parameters"][name] = value
    return edit


def no_data_settings(record: dict) -> None:
    del record["PoisonedDataModule"]


#: (id, edit of the checkpoint or None, config overrides, the one line after "CKPT was trained with ")
CASES = [
    ("data_target_class", None, [f"{DATA}.target_class=3"], "data target_class=0 but the config says 3"),
    ("data_seed", None, [f"{DATA}.seed=1"], "data seed=0 but the config says 1"),
    ("data_poison_rate", None, [f"{DATA}.poison_rate=0.05"], "data poison_rate=0.1 but the config says 0.05"),
    ("data_all_to_all", None, [f"{DATA}.all_to_all=true"], "data all_to_all=False but the config says True"),
    ("data_trigger", None, [f"{DATA}.trigger.init_args.size=4"],
     f"data trigger={BADNETS} but the config says {BADNETS.replace('size=3', 'size=4')}"),
    ("data_unseen_per_class", None, [f"{DATA}.unseen_per_class=5"], "data unseen_per_class=10 but the config says 5"),
    ("data_source", None, [f"{DATA}.source=digits"], "data source=mnist5k but the config says digits"),
    ("data_classes", data_setting("classes", list("abcdefghij")), [],
     "data classes=['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j'] but the config says "
     "['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']"),
    ("data_clean_label", data_setting("clean_label", True), [], "data clean_label=True but the config says False"),
    ("data_first_of_two", None, [f"{DATA}.seed=2", f"{DATA}.target_class=3"],
     "data target_class=0 but the config says 3"),
    ("model_target_class", no_data_settings, [f"{DATA}.target_class=3"],
     "model target_class=0 but the config says 3"),
    ("model_num_classes", model_hparam("num_classes", 43), [], "model num_classes=43 but the config says 10"),
    ("model_architecture_before_data", None, ["--model.init_args.model=preact_resnet18",
                                                  "--model.init_args.model_kwargs={}", f"{DATA}.seed=1"],
     "model model=compact but the config says preact_resnet18"),
    ("model_in_channels", model_hparam("in_channels", 3), [], "model in_channels=3 but the config says 1"),
    ("model_kwargs", None, ["--model.init_args.model_kwargs.widths=[16,64,128]"],
     "model model_kwargs={'widths': [32, 64, 128]} but the config says {'widths': [16, 64, 128]}"),
]


def snapshot(*folders: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


def refused_line(capsys, arguments: list[str]) -> str:
    """Run the CLI expecting a refusal; return its one line (checked to be the only output)."""
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-backdoor: error: "), lines
    return lines[0].removeprefix("lightning-backdoor: error: ")


@pytest.mark.parametrize("edit, overrides, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_test_names_the_first_setting_that_differs(tiny_run, tmp_path, capsys, edit, overrides, message):
    config, checkpoint = tiny_run
    if edit is not None:
        checkpoint = edited(checkpoint, tmp_path, edit)
    before = snapshot(tmp_path, checkpoint.parent)
    line = refused_line(capsys, ["test", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'out'}",
                                 f"--ckpt_path={checkpoint}", *overrides])
    hint = ("; `defend --unseen_per_class K` uses the first K of the run's unseen images per class"
            if "unseen_per_class" in message else "")  # the way to defend with fewer of them
    assert line == f"{checkpoint} was trained with {message}; pass the run's config{hint}"
    assert snapshot(tmp_path, checkpoint.parent) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["validate", "test", "predict", "fit", "defend"])
def test_every_command_that_reads_a_checkpoint_compares_its_settings(tiny_run, tmp_path, capsys, command):
    """``defend`` with another target class used to report "ASR 0.00 -> 0.00" as if it had succeeded."""
    config, checkpoint = tiny_run
    out = tmp_path / "out"
    common = ["--config", str(config), f"--trainer.default_root_dir={out}", f"{DATA}.target_class=3"]
    arguments = ([command, *common, f"--checkpoint={checkpoint}", f"--output_dir={out}"] if command == "defend"
                 else [command, *common, f"--ckpt_path={checkpoint}"])
    before = snapshot(checkpoint.parents[1])
    line = refused_line(capsys, arguments)
    assert line == f"{checkpoint} was trained with data target_class=0 but the config says 3; pass the run's config"
    assert snapshot(checkpoint.parents[1]) == before and not out.exists()


def test_loading_a_run_in_python_compares_its_settings_too(tiny_run):
    """``runs.instantiate_run`` (the benchmarks', the bench's and the tests' way to load a run) checks as the CLI
    does, and loads the checkpoint's weights when the settings agree."""
    config, checkpoint = tiny_run
    line = f"{checkpoint} was trained with data target_class=0 but the config says 3; pass the run's config"
    with pytest.raises(ValueError, match=f"^{re.escape(line)}$"):
        instantiate_run([config], checkpoint, [f"{DATA}.target_class=3"])
    model, data = instantiate_run([config], checkpoint)
    saved = load_tensors(checkpoint)["state_dict"]
    assert data.target_class == 0 and all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    # the run's own saved config.yaml (with fit's ckpt_path and weights_only keys) loads it as well
    model, data = instantiate_run([checkpoint.parent.parent / "config.yaml"], checkpoint)
    assert data.target_class == 0 and all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


def test_the_checkpoint_stores_the_data_settings_as_plain_values(tiny_run):
    record = load_tensors(tiny_run[1])  # weights_only=True: no Trigger object inside
    stored = record["PoisonedDataModule"]
    assert stored["settings"] == QUICKSTART_SETTINGS
    assert {"unseen", "val", "train", "poisoned", "noise"} <= set(stored)


def test_the_same_settings_load(tiny_run, tmp_path, capsys):
    config, checkpoint = tiny_run
    main(["test", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={checkpoint}"])
    assert "test/clean_acc" in capsys.readouterr().out


def test_the_data_module_refuses_another_runs_state():
    """Outside the CLI (a plain ``Trainer(...).fit(ckpt_path=...)``) Lightning calls ``load_state_dict``."""
    trained = PoisonedDataModule().state_dict()
    PoisonedDataModule().load_state_dict(trained)  # the same settings load
    with pytest.raises(ValueError, match=r"^the checkpoint was trained with data target_class=0 but this data module "
                                         r"has 3; use the run's settings$"):
        PoisonedDataModule(target_class=3).load_state_dict(trained)
    without_settings = {name: value for name, value in trained.items() if name != "settings"}
    with pytest.raises(ValueError, match=r"^the checkpoint's unseen split indices differ"):
        PoisonedDataModule(seed=1).load_state_dict(without_settings)


def test_fit_from_a_weights_only_checkpoint_starts_a_new_fit_from_its_weights(tiny_run, tmp_path, capsys,
                                                                             monkeypatch):
    """``defended.ckpt`` holds weights only (no optimizer states): ``fit --ckpt_path`` fine-tunes it."""
    config, checkpoint = tiny_run
    generator = torch.Generator().manual_seed(123)  # weights no seed-0 initialisation could give
    weights = {key: torch.rand(value.shape, generator=generator).to(value.dtype) if value.is_floating_point()
               else value for key, value in load_tensors(checkpoint)["state_dict"].items()}
    weights_only = tmp_path / "defended.ckpt"
    torch.save({"state_dict": weights, "pytorch-lightning_version": "2.6.0", "epoch": 0, "global_step": 0},
               weights_only)
    started_with: dict[str, torch.Tensor] = {}

    def on_fit_start(module: PoisonedClassifier) -> None:
        started_with.update({key: value.detach().clone() for key, value in module.state_dict().items()})

    monkeypatch.setattr(PoisonedClassifier, "on_fit_start", on_fit_start)
    run = tmp_path / "finetuned"
    main(["fit", "--config", str(config), f"--trainer.default_root_dir={run}", f"--ckpt_path={weights_only}"])
    assert f"{weights_only} holds weights only" in capsys.readouterr().out
    assert started_with.keys() == weights.keys()
    assert all(torch.equal(started_with[key], weights[key]) for key in weights)
    assert load_tensors(run / "checkpoints" / "poisoned.ckpt")["global_step"] == 1  # trained from step 0


def test_a_weights_only_checkpoint_for_another_model_is_refused_in_one_line(tiny_run, tmp_path, capsys):
    """No settings to compare (``defended.ckpt`` stores none): the weights themselves are checked before Lightning's
    strict load (a multi-line traceback) could fail."""
    config, checkpoint = tiny_run
    weights_only = tmp_path / "defended.ckpt"
    torch.save({"state_dict": load_tensors(checkpoint)["state_dict"], "epoch": 0, "global_step": 0}, weights_only)
    line = refused_line(capsys, ["test", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'out'}",
                                 f"--ckpt_path={weights_only}", "--model.init_args.model_kwargs.widths=[16,64,128]"])
    assert line.startswith("checkpoint does not match the model spec: first mismatching key "
                           "'net.blocks.0.conv1.weight'")
    assert not (tmp_path / "out").exists()
