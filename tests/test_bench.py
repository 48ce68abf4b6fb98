"""``lightning-backdoor bench``: trains each poisoned model once, resumes from its cache, recognises finished runs,
writes the CSV/table/plot, and rejects a bad grid in one line."""

import csv

import pytest

from lightning_backdoor.bench import Bench, BenchSettings, fit_run
from lightning_backdoor.cli import main

QUICKSTART = ["configs/quickstart.yaml"]
ONE_EPOCH = ["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


class CountingFit:
    """The real training function, counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, configs, overrides, run_dir):
        self.calls += 1
        fit_run(configs, overrides, run_dir)


def settings(tmp_path, **changes):
    values = {"attacks": ["badnets"], "attack_configs": {"badnets": QUICKSTART}, "overrides": ONE_EPOCH,
              "defenses": ["editing", "ft"], "defense_args": {"ft": {"epochs": 2}}, "budgets": [2], "seeds": [0],
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
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    # a second bench with one more seed: no training, only the new seed's two runs are added
    logged = []
    second = Bench(settings(tmp_path, seeds=[0, 1]), fit=fit, log=logged.append)
    second.run()
    assert fit.calls == 1 and second.fits == 0
    assert [row["seed"] for row in rows(tmp_path)] == ["0", "0", "1", "1"]
    assert any("4 runs in the grid, 2 already" in line for line in logged)
    assert any("cached model" in line for line in logged)


def test_bench_reuses_an_already_trained_run_with_the_same_config(tmp_path, quickstart_run):
    fit = CountingFit()
    logged = []
    bench = Bench(settings(tmp_path, overrides=[], defenses=["editing"], search_runs=[str(quickstart_run.parent)],
                           budgets=[11], ), fit=fit, log=logged.append)
    bench.run()  # 11 per class exceeds the run's split of 10: skipped, said so
    assert fit.calls == 0
    assert any(f"reusing the already-trained run {quickstart_run}" in line for line in logged)
    assert any("holds 10 per class" in line for line in logged)


@pytest.mark.parametrize("flags, message", [
    (["--defenses=[ft,bogus]"], "unknown defense 'bogus'; known defenses: anp, editing, fp, ft, ibau, nad, nc"),
    (["--attacks=[wanet]"], "unknown attack 'wanet'; known attacks: badnets"),
    (["--seeds=[]"], "the bench grid is empty: no seeds given"),
])
def test_bad_bench_input_is_one_line_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--config", "configs/bench/quickstart.yaml", f"--output_dir={tmp_path}", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not any(tmp_path.iterdir())
