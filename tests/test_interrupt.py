"""Interruptions: a ``defend`` killed (SIGKILL) halfway through writing leaves the input checkpoint's bytes and its
folder as they were, with no partial or temporary file; a killed ``fit`` resumes from its last checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_backdoor.io import atomic_json, atomic_save

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"

#: Runs the CLI with one step of ``atomic_write`` paused: it writes the ready file, then sleeps until killed.
PAUSING_RUNNER = '''
import os, sys, time
from pathlib import Path
import lightning_backdoor.io as io_module

ready, point, copies = Path(sys.argv[1]), sys.argv[2], []
real_copy = io_module._copy_into

def pause():
    ready.write_text("paused")
    time.sleep(600)

def copy(source, fd):
    copies.append(source)
    if point == "halfway_into_the_output_folder":
        data = Path(source).read_bytes()
        os.write(fd, data[: len(data) // 2])
        pause()
    if point == "after_the_first_output" and len(copies) == 2:
        pause()
    real_copy(source, fd)

io_module._copy_into = copy
from lightning_backdoor.cli import main
main(sys.argv[3:])
'''


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    """Every entry under ``folder``, hidden ones included."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def run_until(ready: Path, command: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.Popen:
    """Start ``command`` and return once ``ready`` exists (the process is then paused mid-write)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before the pause point: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run did not reach the pause point in time")
        time.sleep(0.05)
    return process


@pytest.mark.parametrize("point", ["halfway_into_the_output_folder", "after_the_first_output"])
def test_killed_defend_leaves_input_intact_and_no_partial_file(quickstart_run, tmp_path, point):
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "poisoned.ckpt"
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(quickstart_run / "checkpoints" / "poisoned.ckpt", checkpoint)
    digest, before = sha256(checkpoint), listing(run)
    runner, ready, private = tmp_path / "runner.py", tmp_path / "ready", tmp_path / "private_tmp"
    runner.write_text(PAUSING_RUNNER)
    private.mkdir()
    env = os.environ | {"PYTHONPATH": str(ROOT), "TMPDIR": str(private)}
    process = run_until(ready, [sys.executable, str(runner), str(ready), point, "defend", "--config", str(CONFIG),
                                "--trainer.logger=false", f"--checkpoint={checkpoint}", "--unseen_per_class=5",
                                "--defense.init_args.layer=blocks.2.conv1", "--defense.init_args.strength=1.0"],
                        env)
    if point == "halfway_into_the_output_folder":
        assert listing(run) == before  # the half-written file has no name yet
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert sha256(checkpoint) == digest
    after = listing(run)
    if point == "halfway_into_the_output_folder":
        assert after == before
    else:  # the first output is whole; the report, written last, is absent, so the run reads as unfinished
        assert after == sorted(before + ["defended.ckpt"])
        assert torch.load(run / "defended.ckpt", weights_only=True)["state_dict"]


def test_atomic_writes_without_o_tmpfile_fall_back_to_rename(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    atomic_save({"weight": torch.ones(2)}, tmp_path / "a.ckpt")
    atomic_json({"clean_acc": 1.0}, tmp_path / "a.json")
    atomic_json({"clean_acc": 0.5}, tmp_path / "a.json")
    assert listing(tmp_path) == ["a.ckpt", "a.json"]
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["weight"], torch.ones(2))
    assert '"clean_acc": 0.5' in (tmp_path / "a.json").read_text()


def test_atomic_json_writes_non_finite_numbers_as_text_strict_parsers_accept(tmp_path):
    """An anomaly index is infinite where the MAD is 0: Python's json would write ``Infinity``, which strict
    parsers refuse; the report holds it as text that ``float()`` reads back."""
    atomic_json({"anomaly_index": {"blend": [math.inf, -math.inf, 0.5]}, "loss": (math.nan,)}, tmp_path / "r.json")

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")
    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert report == {"anomaly_index": {"blend": ["inf", "-inf", 0.5]}, "loss": ["nan"]}
    assert [float(value) for value in report["anomaly_index"]["blend"]] == [math.inf, -math.inf, 0.5]


def short_config(tmp_path: Path) -> Path:
    """The quickstart with a checkpoint every epoch and nothing else: 4 batches an epoch, no W&B, no defense."""
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"] |= {"logger": False, "max_epochs": 4, "limit_train_batches": 4, "limit_val_batches": 1,
                          "enable_progress_bar": False, "enable_model_summary": False, "callbacks": [
                              {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "init_args": {"save_top_k": -1, "every_n_epochs": 1}}]}
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_killed_fit_resumes_from_its_last_checkpoint(tmp_path):
    config, first, second = short_config(tmp_path), tmp_path / "first", tmp_path / "second"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "lightning_backdoor.cli", "fit", "--config", str(config)]
    saved = first / "checkpoints" / "epoch=0-step=4.ckpt"
    process = subprocess.Popen([*command, f"--trainer.default_root_dir={first}", "--trainer.max_epochs=1000"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _loads(saved):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    resumed = subprocess.run([*command, f"--trainer.default_root_dir={second}", f"--ckpt_path={saved}"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    names = sorted(path.name for path in (second / "checkpoints").glob("*.ckpt"))
    assert names == ["epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt", "epoch=3-step=16.ckpt"]  # epoch 0 not redone


def _loads(path: Path) -> bool:
    try:
        return path.is_file() and torch.load(path, weights_only=True, map_location="cpu")["global_step"] == 4
    except Exception:  # still being written
        return False
