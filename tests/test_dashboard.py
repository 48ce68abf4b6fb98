"""W&B: offline unless online can work (never a login prompt, never a hang), what a run logs, the report's PNG."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from lightning_backdoor.dashboard import choose_mode, has_credentials, offline_reason, summary_rows
from lightning_backdoor.defenses import DefenseReport, DefenseResult
from lightning_backdoor.defenses.outputs import save_image, write_outputs
from wandb_records import artifacts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_login(tmp_path, monkeypatch):
    """An environment with no W&B mode, key or .netrc entry."""
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "HTTPS_PROXY",
                     "https_proxy", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "missing-netrc"))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_server():
    """A local server that accepts connections and never replies (a stalled W&B server)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def answering_server():
    """A local HTTP server that answers every request with 404."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_no_login_runs_offline_with_one_line(no_login, tmp_path):
    settings = Namespace(offline=False, save_dir=str(tmp_path))
    line = choose_mode(settings, tmp_path)
    assert settings.offline is True
    assert line is not None and "\n" not in line
    assert "no W&B login" in line and f"wandb sync {tmp_path / 'wandb' / 'latest-run'}" in line


def test_an_unreachable_or_silent_server_goes_offline_quickly(no_login, monkeypatch, silent_server):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    for base_url in (f"http://127.0.0.1:{closed_port()}", silent_server):
        monkeypatch.setenv("WANDB_BASE_URL", base_url)
        start = time.perf_counter()
        assert "unreachable" in offline_reason(offline=False)
        assert time.perf_counter() - start < 5  # the probe's 3 s timeout, not W&B's 90 s


def test_online_when_logged_in_and_the_server_answers(no_login, monkeypatch, tmp_path, answering_server):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {answering_server.split('//')[1]}\n  login user\n  password {'k' * 40}\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("WANDB_BASE_URL", answering_server)
    assert has_credentials(answering_server)
    settings = Namespace(offline=False)
    assert choose_mode(settings, tmp_path) is None and settings.offline is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert offline_reason(offline=False) == "WANDB_MODE=offline"


def small_report(picture: bool = False) -> DefenseReport:
    stage = {"clean_acc": 0.98, "asr": 0.5, "asr_floor": 0.01, "robust_acc": 0.4, "target_acc": 1.0,
             "per_class_acc": [0.97, 0.99]}
    after = stage | {"asr": 0.01, "robust_acc": 0.97}
    result = DefenseResult("editing/closed_form", 0.1, layer="head", picture=torch.rand(3, 4, 4) if picture else None)
    return DefenseReport({"before": stage, "after_edit": after, "after": after}, result, 20, der=0.74)


def test_report_plot_is_written_beside_the_report_and_never_overwritten(tmp_path):
    state = {"net.head.weight": torch.randn(2, 3)}
    first = write_outputs(small_report(), state, tmp_path)
    second = write_outputs(small_report(), state, tmp_path)
    plots = [Path(json.loads(path.read_text())["plot"]) for path in (first, second)]
    assert plots == [tmp_path / "defense_report.png", tmp_path / "defense_report-v1.png"]
    assert all(plot.read_bytes()[:8] == PNG_MAGIC for plot in plots)
    assert not list(tmp_path.glob(".*.tmp"))


def test_summary_rows_are_percent_per_stage():
    rows = summary_rows(small_report().to_json())
    assert [row[0] for row in rows] == ["before", "after edit", "after repair"]
    assert rows[0][1:] == [98.0, 50.0, 1.0, 40.0, 100.0]
    mirrored = small_report().to_json()
    for stage, value in (("before", 0.45), ("after_edit", 0.02), ("after", 0.02)):
        mirrored[stage] = mirrored[stage] | {"mirrored_asr": value}
    assert [row[1:] for row in summary_rows(mirrored)] == [[98.0, 50.0, 1.0, 40.0, 100.0, 45.0]] + 2 * [
        [98.0, 1.0, 1.0, 97.0, 100.0, 2.0]]  # a column more, where measured


def test_quickstart_run_logs_samples_trigger_tables_and_artifacts(quickstart_run):
    import wandb

    if wandb.run is not None:
        wandb.finish()  # Lightning leaves the run open; finishing flushes the offline log
    run_dir = next((quickstart_run / "wandb").glob("offline-run-*"))
    media = run_dir / "files" / "media"
    assert len(list((media / "images" / "samples").glob("clean_*.png"))) == 16
    assert len(list((media / "images" / "samples").glob("triggered_*.png"))) == 16
    assert len(list((media / "images").glob("trigger_*.png"))) == 2
    assert list((media / "images" / "defense").glob("plot_*.png"))

    report = json.loads((quickstart_run / "defense_report.json").read_text())
    summary = json.loads(next((media / "table" / "defense").glob("summary_*.table.json")).read_text())
    assert summary["data"] == summary_rows(report)
    per_class = json.loads(next((media / "table" / "defense").glob("per_class_acc_*.table.json")).read_text())
    assert len(per_class["data"]) == 10
    assert per_class["data"][0][-1] == round(100 * report["after"]["per_class_acc"][0], 2)

    logged = artifacts(next(run_dir.glob("run-*.wandb")))
    kinds = {kind: files for kind, files in logged.values()}
    assert {"defense_report.json", "defense_report.png"} <= set(kinds["defense_report"])
    assert set(kinds["model"]) == {"defended.ckpt", "defended.safetensors"}
    staged = [Path(local) for files in kinds.values() for local in files.values()]
    assert all(path.is_file() for path in staged), staged  # copies wait there for `wandb sync`


def test_log_defense_logs_an_estimated_trigger_and_both_artifacts(tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from lightning_backdoor.dashboard import log_defense

    report = small_report(picture=True)
    write_outputs(report, {"net.head.weight": torch.randn(2, 3)}, tmp_path / "run")
    assert report.files["estimated_trigger"] == tmp_path / "run" / "estimated_trigger.png"

    run = wandb.init(dir=tmp_path, project="tests", mode="offline", reinit="create_new")
    log_defense([WandbLogger(experiment=run), object()], report, ["zero", "one"])
    run.finish()

    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    images = run_dir / "files" / "media" / "images" / "defense"
    assert list(images.glob("estimated_trigger_*.png")) and list(images.glob("plot_*.png"))
    per_class = json.loads(next(run_dir.glob("files/media/table/defense/per_class_acc_*.table.json")).read_text())
    assert per_class["data"] == [["zero", 97.0, 97.0, 97.0], ["one", 99.0, 99.0, 99.0]]
    logged = {kind: set(files) for kind, files in artifacts(next(run_dir.glob("run-*.wandb"))).values()}
    assert logged["defense_report"] == {"defense_report.json", "defense_report.png", "estimated_trigger.png"}
    assert logged["model"] == {"defended.ckpt", "defended.safetensors"}


def test_save_image_creates_its_folder_and_enlarges_the_picture(tmp_path):
    from PIL import Image

    path = tmp_path / "new" / "folder" / "trigger.png"
    save_image(torch.rand(3, 4, 5), path, scale=8)
    assert Image.open(path).size == (40, 32) and list(path.parent.iterdir()) == [path]  # no temporary file left


def test_wandb_mode_disabled_wins_over_an_offline_config(monkeypatch, tmp_path):
    """The configs ship ``offline: true``; Lightning's logger would turn that into an offline run on disk even
    under ``WANDB_MODE=disabled``. Disabled means nothing written: the flag is cleared and the mode left to W&B."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    settings = Namespace(offline=True, save_dir=str(tmp_path))
    line = choose_mode(settings, tmp_path)
    assert settings.offline is False and line is not None and "disabled" in line and "\n" not in line
    import wandb
    from lightning.pytorch.loggers import WandbLogger
    wandb.teardown()  # W&B reads the mode once per process: a fresh start, as a new `lightning-backdoor` process has
    logger = WandbLogger(save_dir=str(tmp_path), offline=settings.offline)
    logger.log_metrics({"x": 1.0})
    from lightning_backdoor.dashboard import log_defense
    report = small_report()
    write_outputs(report, {"net.head.weight": torch.randn(2, 3)}, tmp_path / "run")
    messages = []
    monkeypatch.setattr("lightning_backdoor.dashboard.rank_zero_info", messages.append)
    log_defense([logger], report)  # no run to log to: nothing logged, and no line claiming it was
    assert messages == []
    logger.experiment.finish()
    assert not (tmp_path / "wandb").exists()  # nothing written
