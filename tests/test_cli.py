"""Bad input to ``lightning-backdoor fit`` ends with one line naming the problem, exit code 2, nothing written."""

import pytest

from lightning_backdoor.cli import main


@pytest.mark.parametrize("arg, message", [
    ("--data.init_args.poison_rate=1.5", "poison_rate=1.5 is outside [0, 1]"),
    ("--data.init_args.target_class=12", "target_class=12 is not a class; valid: 0..9"),
    ("--data.init_args.trigger.init_args.size=40", "trigger size 40 is larger than the 28x28 image"),
    ("--data.init_args.unseen_per_class=500", "too few for unseen_per_class=500"),
    ("--model.init_args.model=nope", "unknown model 'nope'; known models: compact"),
    ("--data.init_args.source=nope", "unknown data source 'nope'; known sources: mnist5k"),
    ("--data.init_args.root=/nonexistent", "does not exist"),
])
def test_bad_fit_input(arg, message, tmp_path, capsys):
    extra = ["--data.init_args.source=imagefolder"] if "root" in arg else []
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/quickstart.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}", arg,
              *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in error if "error" in line]) == 1
    assert message in error[-1] and error[-1].startswith("lightning-backdoor: error:")
    assert not (tmp_path / "run").exists()


def test_fit_refuses_to_reuse_a_run_folder(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("seed_everything: 0\\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/quickstart.yaml", f"--trainer.default_root_dir={tmp_path}"])
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == "seed_everything: 0\\n"
