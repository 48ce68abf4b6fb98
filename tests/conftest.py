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

# Under pytest-xdist the workers share the cores: each worker, and every process it starts, takes its share of the
# threads instead of all of them, so that two workers do not oversubscribe two cores
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)


def finish_wandb_run() -> None:
    """Close the process's open W&B run, if any: Lightning's WandbLogger would otherwise log the next in-process fit
    into it (instead of that fit's own run folder), and closing flushes its offline files."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def fitted_once(tmp_path_factory: pytest.TempPathFactory, name: str, *overrides: str) -> Path:
    """The quickstart config fitted through the real CLI (its DefenseCallback runs at the end) into a folder named
    ``name``, once per test session. Under pytest-xdist (``-n 2``) the session fixtures run once per worker, so the
    first worker fits into a folder shared by the workers while the others wait on its lock, then reuse it."""
    from filelock import FileLock

    from lightning_backdoor.cli import main

    def fit(root: Path) -> None:
        finish_wandb_run()
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={root}",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *overrides])
        finish_wandb_run()

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        root = tmp_path_factory.mktemp(name)
        fit(root)
        return root
    shared = tmp_path_factory.getbasetemp().parent / "shared-runs"  # beside the workers' own temporary folders
    shared.mkdir(exist_ok=True)
    root, done = shared / name, shared / f"{name}.fitted"
    with FileLock(shared / f"{name}.lock"):
        if not done.exists():
            fit(root)
            done.touch()
    return root


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart fitted (poisoned, then defended at the end of fit); shared by tests."""
    return fitted_once(tmp_path_factory, "quickstart")


@pytest.fixture(scope="session")
def clean_quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart fitted with no poison (poison_rate 0): a clean model of the same data; shared by tests."""
    return fitted_once(tmp_path_factory, "quickstart-clean", "--data.init_args.poison_rate=0")


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription (10x faster here). Modules of
    such tests take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
