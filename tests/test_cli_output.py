"""What the command line prints: ``--help`` lists every subcommand; a refused command prints its one line and nothing
else (no Lightning warning, device lines or tips), checked on a real process's stdout and stderr together; a folder
holding a run's or a defense's outputs is not fitted into."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_backdoor.cli import main, quiet_third_party_noise

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.yaml")


def run_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """The console script's module in a fresh process, stdout and stderr captured as one stream."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lightning_backdoor.cli", *arguments], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, timeout=300)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ("fit", "validate", "test", "predict", "defend", "bench"):
        assert sum(line.split()[:1] == [name] for line in lines) == 1, f"{name} is not listed once"


def test_defend_help_starts_with_its_usage(tmp_path):
    result = run_cli("defend", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: lightning-backdoor defend "), result.stdout[:300]
    assert "LightningCLI's args parameter" not in result.stdout  # the warning it used to start with
    for option in ("--checkpoint", "--unseen_root", "--test_root", "--classes", "--accept_low_accuracy"):
        assert option in result.stdout


def test_a_refused_defend_prints_one_line(tmp_path):
    """It used to print Lightning's warning about ``args``, its GPU/TPU lines and a logger tip first (8 lines). (A
    missing checkpoint's message: tests/test_bad_input.py's checkpoint_missing, in-process.)"""
    (tmp_path / "empty.ckpt").write_bytes(b"")
    result = run_cli("defend", "--config", CONFIG, f"--checkpoint={tmp_path / 'empty.ckpt'}",
                     f"--output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-backdoor: error: ") and (
        "not a plain tensor file" in lines[0]), lines
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty.ckpt"]


def test_a_refused_fit_prints_one_line(tmp_path):
    """Refused after parsing (where Lightning has already seeded and said so): still one line."""
    result = run_cli("fit", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path / 'run'}",
                     "--data.init_args.poison_rate=1.5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [
        "lightning-backdoor: error: poison_rate=1.5 is outside [0, 1]; use e.g. poison_rate=0.1 for 10 %"]
    assert not any(tmp_path.iterdir())


def test_a_fit_refused_while_the_trainer_sets_up_prints_one_line(tmp_path):
    """A callback's setup check (the default defense needs one target class) runs after the Trainer has printed its
    device lines and tips: they are held back until setup has passed."""
    result = run_cli("fit", "--config", CONFIG, "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path / 'run'}", "--data.init_args.all_to_all=true", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-backdoor: error: ") and "all_to_all" in lines[0], lines


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_an_accelerator_the_machine_lacks_is_refused_in_one_line(tmp_path):
    """Lightning's own setup error (no GPU for ``accelerator: gpu``) is one line and exit 2, not a traceback."""
    result = run_cli("fit", "--config", CONFIG, "--trainer.accelerator=gpu",
                     f"--trainer.default_root_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("lightning-backdoor: error: ") and "gpu" in lines[-1], lines
    assert "Traceback" not in result.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("output", ["defended.ckpt", "defended-v2.ckpt", "defended.safetensors",
                                    "defense_report.json", "defense_report-v1.json", "splits.json",
                                    "checkpoints/poisoned.ckpt", "config.yaml"])
def test_fit_refuses_a_folder_holding_outputs(tmp_path, capsys, output):
    (tmp_path / output).parent.mkdir(exist_ok=True)
    (tmp_path / output).write_text("kept\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"lightning-backdoor: error: {tmp_path} already holds a run ({output}); "
                                               f"choose a new --trainer.default_root_dir (nothing is overwritten)")
    assert [path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file()] == [output]
    assert (tmp_path / output).read_text() == "kept\n"


@pytest.mark.parametrize("arguments, line", [
    (["defend", "--checkpoint=none.ckpt", "--defense=ActivationEditting"],
     "defense: no class named 'ActivationEditting'; did you mean ActivationEditing?"),
    (["defend", "--checkpoint=none.ckpt", "--defense=EstimateFrist"],
     "defense: no class named 'EstimateFrist'; did you mean EstimateFirst?"),
    (["fit", "--data.init_args.trigger=lightning_backdoor.triggers.BadNetz"],
     "data.trigger: no class named 'BadNetz'; did you mean BadNets or WaNet?"),
    (["fit", "--data.init_args.trigger=mypackage.MyTrigger"],  # another package's path keeps its own error
     "data.trigger: class_path 'mypackage.MyTrigger': No module named 'mypackage'"),
    (["fit", "--data.init_args.trigger=Zzzqq"],
     "data.trigger: no class named 'Zzzqq'; known: AdaptiveBlend, Additive, BadNets, Blended, BppAttack, "
     "CustomTrigger, FTrojan, InputAware, LabelConsistent, LowFrequency, Mirrored, SIG, Shifted, TrojanNN, WaNet"),
    (["defend", "--checkpoint=none.ckpt", "--defense.init_args.strenght=null"],
     "defense: class_path 'lightning_backdoor.defenses.ActivationEditing': Option 'strenght' is not accepted; "
     "did you mean strength?"),
    (["fit", "--data.init_args.trigger.init_args.sise=3"],
     "data.trigger: class_path 'lightning_backdoor.triggers.BadNets': Option 'sise' is not accepted; did you mean "
     "size?"),
    (["defend"], "missing --checkpoint"),  # a required argument is named as the option it is given by
    (["fit", "--trainer.max-epochs=3"],
     "unrecognized arguments: --trainer.max-epochs=3; options are spelt with underscores: did you mean "
     "--trainer.max_epochs?"),
    (["fit", "--trainer.max_epoch=3"],  # a subcommand's own option, misspelt
     "unrecognized arguments: --trainer.max_epoch=3; did you mean --trainer.max_epochs?"),
    (["test", "--ckpt_pth=x.ckpt"], "unrecognized arguments: --ckpt_pth=x.ckpt; did you mean --ckpt_path?"),
    (["defend", "--checkpoint=none.ckpt", "--unseen_per_clas=3"],
     "unrecognized arguments: --unseen_per_clas=3; did you mean --unseen_per_class?"),
    (["fit", "--zzzqq=3"], "unrecognized arguments: --zzzqq=3"),  # nothing close: no guess
])
def test_a_misspelt_class_or_option_is_refused_with_the_closest_names(tmp_path, capsys, arguments, line):
    command, *rest = arguments
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", CONFIG, *rest, f"--trainer.default_root_dir={tmp_path / 'run'}"]
             if command in ("fit", "test") else [command, "--config", CONFIG, *rest, f"--output_dir={tmp_path / 'out'}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"lightning-backdoor: error: {line}"
    assert not any(tmp_path.iterdir())


def test_third_party_noise_is_dropped_and_nothing_else(caplog) -> None:
    """Lightning's deprecated-torch-API warning, its model summary's bf16 note and its LitLogger advertisement are
    dropped from the console; any other warning or info line is kept."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.",
                      DeprecationWarning)
        warnings.warn("Precision bf16-mixed is not supported by the model summary.  Estimated model size in MB will "
                      "not be accurate. Using 32 bits instead.", UserWarning)
        warnings.warn("a warning of our own", UserWarning)
    assert [str(warning.message) for warning in caught] == ["a warning of our own"]
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger](https://pypi.org/project/"
                       "litlogger/) to enable LitLogger")
        rank_zero_info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False, used: False"]
