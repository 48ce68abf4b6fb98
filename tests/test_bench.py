"""``lightning-backdoor bench``: trains each poisoned model once, resumes from its cache, recognises finished runs,
writes the CSV/table/plot, and rejects a bad grid in one line."""

import csv

import pytest

from lightning_backdoor.bench import Bench, BenchSettings, append_row, fit_run, parser, read_rows, table
from lightning_backdoor.defenses.base import defense_name
from lightning_backdoor.cli import main
from lightning_backdoor.defenses import DEFENSES, ActivationEditing, FineTuning

QUICKSTART = ["configs/quickstart.yaml"]
# One epoch, and only the checkpoint callback: the quickstart's fit-end defense would refuse a model this close to
# chance (how close depends on how the machine rounds), and the bench defends the cached model itself.
ONE_EPOCH = ["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
             '"init_args": {"filename": "poisoned", "save_last": false}}]']


class CountingFit:
    """The real training function, counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, configs, overrides, run_dir):
        self.calls += 1
        fit_run(configs, overrides, run_dir)


def settings(tmp_path, **changes):
    values = {"attacks": ["badnets"], "attack_configs": {"badnets": QUICKSTART}, "overrides": ONE_EPOCH,
              "defenses": [ActivationEditing(), FineTuning(epochs=2)], "budgets": [2], "seeds": [0],
              "cache_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "out")}
    return BenchSettings(**(values | changes))


def rows(tmp_path):
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_bench_trains_once_then_resumes_from_its_cache(tmp_path):
    fit = CountingFit()
    first = Bench(settings(tmp_path), fit=fit)
    first.run()
    assert fit.calls == 1 and first.fits == 1
    assert [(row["defense"], row["num_unseen"]) for row in rows(tmp_path)] == [("editing", "20"), ("ft", "20")]
    for name in ("results.md", "results.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| badnets | 2 | 20 | editing |" in (tmp_path / "out" / "results.md").read_text()
    # the trigger's mirror image (a model trained with flips learns it) is measured before and after each defense
    assert all(0 <= float(row["mirrored_asr"]) <= 1 and 0 <= float(row["mirrored_asr_before"]) <= 1
               for row in rows(tmp_path))
    # and so is the worst of its moves (and the mirror image's) by a crop's 1/8 of the width (3 px on 28x28)
    assert all(0 <= float(row["moved_asr"]) <= 1 and 0 <= float(row["moved_asr_before"]) <= 1
               for row in rows(tmp_path))
    assert "| ASR floor % | mirrored ASR % | moved ASR % |" in (tmp_path / "out" / "results.md").read_text()
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    # a second bench with one more seed: no training, only the new seed's two runs are added
    logged = []
    second = Bench(settings(tmp_path, seeds=[0, 1]), fit=fit, log=logged.append)
    second.run()
    assert fit.calls == 1 and second.fits == 0
    assert [row["seed"] for row in rows(tmp_path)] == ["0", "0", "1", "1"]
    assert any("4 runs in the grid, 2 already" in line for line in logged)
    assert any("cached model" in line for line in logged)
    # the same output folder with other FT settings: refused in one line, not answered with the old rows
    with pytest.raises(ValueError, match=r"holds ft rows made with other settings .*give another output_dir"):
        Bench(settings(tmp_path, defenses=[ActivationEditing(), FineTuning(epochs=3)]), fit=fit).run()
    assert len(rows(tmp_path)) == 4 and {row["settings"] for row in rows(tmp_path) if row["defense"] == "ft"} == {
        '{"batch_size": 64, "class": "FineTuning", "epochs": 2, "lr": 0.01}'}
    # one epoch leaves the quickstart model near chance (CA 25 %, ASR 0 %): the bench says its rows measure nothing
    assert any("warning: badnets's poisoned model is near chance" in line or "no working backdoor" in line
               for line in logged)


def test_bench_reuses_an_already_trained_run_with_the_same_config(tmp_path, quickstart_run):
    fit = CountingFit()
    logged = []
    bench = Bench(settings(tmp_path, overrides=[], defenses=[ActivationEditing()],
                           search_runs=[str(quickstart_run.parent)], budgets=[11]), fit=fit, log=logged.append)
    bench.run()  # 11 per class exceeds the run's split of 10: skipped, said so
    assert fit.calls == 0
    assert any(f"reusing the already-trained run {quickstart_run}" in line for line in logged)
    assert any("holds 10 per class" in line for line in logged)


def defenses_of(*flags):
    """The configured defenses of a bench command line, as ``run_bench`` gets them (nothing runs)."""
    arguments = parser()
    return arguments.instantiate(arguments.parse_args(list(flags))).defenses


def test_bench_configs_name_defenses_by_class_path():
    quickstart = defenses_of("--config", "configs/bench/quickstart.yaml")
    assert [defense_name(defense) for defense in quickstart] == ["editing", "ft"]
    cifar10 = defenses_of("--config", "configs/bench/cifar10.yaml")
    assert [defense_name(defense) for defense in cifar10] == ["editing", "ft", "ftsam", "fp", "nad", "ibau", "nc",
                                                               "anp", "sau"]
    assert cifar10[0].layer == "blocks.2.conv2" and cifar10[-2].iterations == 200 and cifar10[-1].rounds == 100
    u250 = defenses_of("--config", "configs/bench/cifar10-u250.yaml")
    assert [defense_name(defense) for defense in u250] == ["editing", "ft", "ftsam", "anp", "sau", "ibau"]
    assert u250[4].rounds == 5


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_registered_defense_is_a_bench_row_under_its_name(name):
    """Its short class name (or full class path) and init_args, as in any config; the row carries the registered
    name."""
    cls = DEFENSES[name]
    for class_path in (cls.__name__, f"{cls.__module__}.{cls.__name__}"):
        (defense,) = defenses_of("--config", "configs/bench/quickstart.yaml",
                                 f"--defenses=[{{class_path: {class_path}}}]")
        assert type(defense) is cls and defense_name(defense) == name


@pytest.mark.parametrize("flags, messages", [
    (["--defenses=[{class_path: FineTuning}, {class_path: bogus}]"], ["defenses: ", "bogus"]),
    (["--defenses=[FineTuning, {class_path: FineTuning, init_args: {epochs: 2}}]"],
     ["defense 'ft' is listed twice"]),
    (["--attacks=[wanet]"], ["unknown attack 'wanet'; known attacks: badnets"]),
    (["--seeds=[]"], ["the bench grid is empty: no seeds given"]),
    (["--defenses=[{class_path: FineTunning}]"],  # a misspelt class: the registry's close names
     ["defenses: class_path 'FineTunning' does not import: unknown defense class 'FineTunning' (did you mean "
      "'FineTuning', 'FinePruning'?); known defense classes: ANP, ActivationEditing, "]),
    (["--defenses=[{class_path: lightning_backdoor.defenses.ActivationEditting}]"],
     ["unknown defense class 'ActivationEditting' (did you mean 'ActivationEditing'?)"]),
    (["--defenses=[{class_path: ft}]"], ["defenses: 'ft' is the row name of class_path 'FineTuning'"]),
    (["--defenses=[{class_path: nomodule.Defense}]"], ["defenses: class_path 'nomodule.Defense': No module named"]),
    (["--seds=[0]"], ["unrecognized arguments: --seds=[0]; did you mean --seeds?"]),
])
def test_bad_bench_input_is_one_line_exit_2(tmp_path, capsys, flags, messages):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--config", "configs/bench/quickstart.yaml", f"--output_dir={tmp_path}", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert all(message in error for message in messages) and len(error.splitlines()) == 1, error
    assert not any(tmp_path.iterdir())


def test_a_config_key_is_the_same_in_every_process():
    """The quickstart's config holds a function (its optimizer); hashed by its import path, not its address, so
    a run is found again by a later process."""
    import subprocess
    import sys

    code = ("from lightning_backdoor.runs import config_key, training_config; "
            "print(config_key(training_config(['configs/quickstart.yaml'], [])))")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
            for _ in range(2)}
    assert len(keys) == 1 and len(keys.pop()) == 12


def test_a_composed_defense_has_the_same_settings_in_every_instance():
    """Neural Cleanse holds an estimator and an inner defense: its settings name their values, not their memory
    addresses, so a resumed bench recognises its own rows."""
    from lightning_backdoor.bench import defense_settings
    from lightning_backdoor.defenses import NeuralCleanseUnlearning

    first, second = defense_settings(NeuralCleanseUnlearning()), defense_settings(NeuralCleanseUnlearning())
    assert first == second and "0x" not in first and '"max_steps": 300' in first
    assert first != defense_settings(NeuralCleanseUnlearning(max_steps=100))


def test_a_metric_the_trigger_does_not_have_is_a_blank_cell_not_an_error(tmp_path):
    """A global trigger has no moves: its rows keep ``moved_asr`` empty in the CSV, read back as ``None``, and the
    table leaves the cell blank while the measured mirror image's is filled."""
    row = {"attack": "blended", "defense": "editing", "unseen_per_class": 1, "seed": 0, "num_unseen": 10,
           "seconds": 1.0, "run": "r", "test_images": 100, "test_precision": "float32", "settings": "{}", "der": 0.9,
           "clean_acc_before": 0.9, "asr_before": 0.99, "target_acc_before": 0.9, "mirrored_asr_before": 0.98,
           "clean_acc": 0.9, "asr": 0.02, "asr_floor": 0.01, "robust_acc": 0.8, "target_acc": 0.9,
           "mirrored_asr": 0.03}
    path = tmp_path / "results.csv"
    append_row(path, row)
    (read,) = read_rows(path)
    assert read["moved_asr"] is None and read["moved_asr_before"] is None and read["mirrored_asr"] == 0.03
    lines = table([read]).splitlines()
    assert lines[2] == "| blended | 1 | – | none | 90.00 | 99.00 | | 98.00 |  | | 90.00 | | | | |"
    assert "| 1.00 | 3.00 |  | 80.00 |" in lines[3]
