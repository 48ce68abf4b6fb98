"""Test settings (W&B offline, its files in a temporary folder: never a login prompt) and shared fixtures."""

from __future__ import annotations

import os
import tempfile

_WANDB_TMP = tempfile.mkdtemp(prefix="wandb-tests-")
os.environ.setdefault("WANDB_MODE", "offline")
for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
    os.environ.setdefault(variable, _WANDB_TMP)
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def finish_wandb_run() -> None:
    """Close the process's open W&B run, if any: Lightning's WandbLogger would otherwise log the next in-process fit
    into it (instead of that fit's own run folder), and closing flushes its offline files."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """Fit the quickstart config through the real CLI (its DefenseCallback runs at the end); shared by tests."""
    from lightning_backdoor.cli import main

    root = tmp_path_factory.mktemp("quickstart")
    finish_wandb_run()
    main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={root}",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    finish_wandb_run()
    return root


@pytest.fixture(scope="session")
def clean_quickstart_run(tmp_path_factory):
    """The quickstart fitted with no poison (poison_rate 0): a clean model of the same data; shared by tests."""
    from lightning_backdoor.cli import main

    root = tmp_path_factory.mktemp("quickstart-clean")
    finish_wandb_run()
    main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={root}",
          "--data.init_args.poison_rate=0", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false"])
    finish_wandb_run()
    return root


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription (10x faster here). Modules of
    such tests take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
