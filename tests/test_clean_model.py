"""A model trained without poison keeps its clean accuracy (within 0.5 pt) under the default defense."""

from __future__ import annotations

import json

from lightning_backdoor.cli import main

CONFIG = "configs/quickstart.yaml"
TOLERANCE = 0.005


def test_defending_a_clean_model_keeps_its_clean_accuracy(clean_quickstart_run, tmp_path):
    # the quickstart's fit-end defense (layer and strength chosen by cross-validation) on the clean model
    fit_report = json.loads((clean_quickstart_run / "defense_report.json").read_text())
    assert abs(fit_report["after"]["clean_acc"] - fit_report["before"]["clean_acc"]) <= TOLERANCE
    # `defend` with its default defense (ActivationEditing() as constructed with no arguments)
    main(["defend", "--config", CONFIG, "--trainer.logger=false", "--data.init_args.poison_rate=0",
          f"--checkpoint={clean_quickstart_run / 'checkpoints' / 'poisoned.ckpt'}", f"--output_dir={tmp_path}"])
    report = json.loads((tmp_path / "defense_report.json").read_text())
    assert report["before"]["clean_acc"] > 0.9  # a real model, not an untrained one
    assert abs(report["after"]["clean_acc"] - report["before"]["clean_acc"]) <= TOLERANCE
