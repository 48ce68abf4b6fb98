"""A model trained without poison keeps its clean accuracy (loses at most 1 pt) under the default defense."""

from __future__ import annotations

import json

from lightning_backdoor.cli import main

CONFIG = "configs/quickstart.yaml"
#: 10 of the 1,000 test images: the edit of a clean model moves a few boundary images either way, and another
#: machine's clean model (trained with other float rounding) has other boundary images; a gain is no failure
TOLERANCE = 0.01


def test_defending_a_clean_model_keeps_its_clean_accuracy(clean_quickstart_run, tmp_path):
    # the quickstart's fit-end defense (layer and strength chosen by cross-validation) on the clean model
    fit_report = json.loads((clean_quickstart_run / "defense_report.json").read_text())
    assert fit_report["after"]["clean_acc"] >= fit_report["before"]["clean_acc"] - TOLERANCE
    # `defend` with its default defense (ActivationEditing() as constructed with no arguments)
    main(["defend", "--config", CONFIG, "--trainer.logger=false", "--data.init_args.poison_rate=0",
          f"--checkpoint={clean_quickstart_run / 'checkpoints' / 'poisoned.ckpt'}", f"--output_dir={tmp_path}"])
    report = json.loads((tmp_path / "defense_report.json").read_text())
    assert report["before"]["clean_acc"] > 0.9  # a real model, not an untrained one
    assert report["after"]["clean_acc"] >= report["before"]["clean_acc"] - TOLERANCE
