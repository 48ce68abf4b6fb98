"""Test settings (W&B offline, its files in a temporary folder: never a login prompt) and shared fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_WANDB_TMP = tempfile.mkdtemp(prefix="wandb-tests-")
atexit.register(shutil.rmtree, _WANDB_TMP, ignore_errors=True)  # each test process removes its own at exit
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
# (an OMP_NUM_THREADS the user set is kept, for both)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _CORES // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def finish_wandb_run() -> None:
    """Close the process's open W&B run, if any: Lightning's WandbLogger would otherwise log the next in-process fit
    into it (instead of that fit's own run folder), and closing flushes its offline files."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


#: the quickstart runs that many tests share: fixture name -> folder name and the CLI overrides of its fit
SHARED_RUNS = {"quickstart_run": ("quickstart", ()),
               "clean_quickstart_run": ("quickstart-clean", ("--data.init_args.poison_rate=0",))}


def fit_quickstart(root: Path, overrides: tuple[str, ...]) -> None:
    """The quickstart config fitted through the real CLI (its DefenseCallback runs at the end) into ``root``."""
    from lightning_backdoor.cli import main

    finish_wandb_run()
    main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={root}",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *overrides])
    finish_wandb_run()


def fit_shared(shared: Path, fixture: str, wait: bool) -> Path | None:
    """Under pytest-xdist: the shared run of ``fixture``, fitted by whichever worker gets its lock first into a new
    folder under ``shared`` (a folder all workers see; a failed attempt's folder is left behind, and the next worker
    retries in a fresh one), whose path ``<name>.fitted`` then records; ``wait=False``: ``None`` at once when
    another worker holds the lock."""
    from filelock import FileLock, Timeout

    name, overrides = SHARED_RUNS[fixture]
    lock, done = FileLock(shared / f"{name}.lock"), shared / f"{name}.fitted"
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return None
    try:
        if not done.exists():
            root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=shared))
            fit_quickstart(root, overrides)
            done.write_text(str(root))
        return Path(done.read_text())
    finally:
        lock.release()


def shared_run(request: pytest.FixtureRequest, fixture: str) -> Path:
    """A run of :data:`SHARED_RUNS`, fitted once per test session. Under pytest-xdist (``-n 2``) session fixtures
    run once per worker, so the first worker to need a run fits it into a folder all workers see; a worker that
    finds it being fitted first fits another shared run the session's tests need (if no worker has begun it), then
    waits for its own. Two workers thus fit the two quickstart runs side by side instead of one waiting."""
    factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        root = factory.mktemp(SHARED_RUNS[fixture][0])
        fit_quickstart(root, SHARED_RUNS[fixture][1])
        return root
    shared = factory.getbasetemp().parent / "shared-runs"  # beside the workers' own temporary folders
    shared.mkdir(exist_ok=True)
    root = fit_shared(shared, fixture, wait=False)
    if root is None:
        needed = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
        for other in sorted(needed & (SHARED_RUNS.keys() - {fixture})):
            try:
                fit_shared(shared, other, wait=False)
            except Exception:  # noqa: BLE001 - that run's own fixture refits it and reports its error
                pass
        root = fit_shared(shared, fixture, wait=True)
    return root


@pytest.fixture(scope="session")
def quickstart_run(request: pytest.FixtureRequest) -> Path:
    """The quickstart fitted (poisoned, then defended at the end of fit); shared by tests."""
    return shared_run(request, "quickstart_run")


@pytest.fixture(scope="session")
def clean_quickstart_run(request: pytest.FixtureRequest) -> Path:
    """The quickstart fitted with no poison (poison_rate 0): a clean model of the same data; shared by tests."""
    return shared_run(request, "clean_quickstart_run")


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription (10x faster here). Modules of
    such tests take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: test files with the suite's longest tests, run first (in this order) so that under pytest-xdist they start while
#: the short tests can still fill the other worker: last in line, one of them would keep a worker busy alone at the
#: end (measured with ``--durations=0``: DDP 142 s, the torchvision ResNet-18 84 s, the foreign MNIST model 76 s,
#: the notebook 63 s, each per test on one of two workers)
LONGEST_FIRST = ("test_ddp.py", "test_foreign_module.py", "test_foreign_weights.py", "test_notebook.py",
                 "test_prescreen.py", "test_callback_outputs.py", "test_estimation.py", "test_interrupt.py",
                 "test_reproducible.py", "test_bench.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the tests of :data:`LONGEST_FIRST` to the front, keeping every file's own order."""
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
