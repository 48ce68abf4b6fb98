"""Crafted checkpoints whose loading would run code (create a marker file) go through every load path we have:
``io.load_state_dict``, ``defend --checkpoint``, and ``test``/``fit --ckpt_path``. None may run code; each ends with
one line on stderr and exit code 2, and writes nothing."""

from __future__ import annotations

import io
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lightning_backdoor.cli import main
from lightning_backdoor.io import load_state_dict

CONFIG = "configs/quickstart.yaml"
MARKER_MODULE = "lb_untrusted_marker"


class Exploit:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears iff the loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plain_checkpoint(hyper_parameters: object = None) -> dict:
    """A Lightning-shaped checkpoint of plain tensors (loads with weights_only=True)."""
    checkpoint = {"state_dict": {"net.head.weight": torch.zeros(2, 2)}, "pytorch-lightning_version": "2.6.0",
                  "epoch": 0, "global_step": 0}
    if hyper_parameters is not None:
        checkpoint["hyper_parameters"] = hyper_parameters
    return checkpoint


def torch_zip_with_payload(path: Path, payload: bytes) -> None:
    """A real torch zip archive whose ``data.pkl`` is replaced by ``payload``."""
    buffer = io.BytesIO()
    torch.save({"net.head.weight": torch.zeros(2)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = payload if item.filename.endswith("/data.pkl") else source.read(item)
            target.writestr(item, data)


def crafted_files(folder: Path, marker: Path) -> dict[str, Path]:
    """Write every crafted file into ``folder``; returns name -> path."""
    exploit = Exploit(marker)
    payload = pickle.dumps(exploit, protocol=2)
    writers: dict[str, tuple[str, Callable[[Path], object]]] = {
        "lightning_dict": (".ckpt", lambda p: torch.save({"state_dict": {"net.head.weight": exploit},
                                                          "epoch": 0}, p)),
        "bare_state_dict": (".pt", lambda p: torch.save({"net.head.weight": exploit}, p)),
        "nested_in_list": (".ckpt", lambda p: torch.save([{"state_dict": exploit}], p)),
        "legacy_non_zip": (".ckpt", lambda p: torch.save({"state_dict": exploit}, p,
                                                         _use_new_zipfile_serialization=False)),
        "zip_with_evil_data_pkl": (".ckpt", lambda p: torch_zip_with_payload(p, payload)),
        "raw_pickle": (".ckpt", lambda p: p.write_bytes(payload)),
        "exploit_in_hyper_parameters": (".ckpt", lambda p: torch.save(plain_checkpoint(exploit), p)),
        "class_path_in_hyper_parameters": (".ckpt", lambda p: torch.save(plain_checkpoint(
            {"_class_path": f"{MARKER_MODULE}.Model"}), p)),
        "nested_class_path_in_hyper_parameters": (".ckpt", lambda p: torch.save(plain_checkpoint(
            {"_class_path": "lightning_backdoor.PoisonedClassifier",
             "model_kwargs": {"widths": [32, 64, 128], "act": {"class_path": f"{MARKER_MODULE}.Act"}}}), p)),
        "safetensors_bad_header": (".safetensors", lambda p: p.write_bytes(struct.pack("<Q", 12) + b"{not json!!")),
        "safetensors_huge_header": (".safetensors", lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}")),
        "pickle_named_safetensors": (".safetensors", lambda p: torch.save({"state_dict": exploit}, p)),
        "truncated": (".ckpt", lambda p: p.write_bytes(_torch_bytes(plain_checkpoint())[:300])),
        "empty": (".ckpt", lambda p: p.write_bytes(b"")),
        "directory": (".ckpt", lambda p: p.mkdir()),
    }
    paths = {}
    for name, (suffix, write) in writers.items():
        # "last" opens each name: a file named like Lightning's own `--ckpt_path last` must not skip the checks
        paths[name] = folder / f"last_{name}{suffix}"
        write(paths[name])
    return paths


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


CRAFTED = ("lightning_dict", "bare_state_dict", "nested_in_list", "legacy_non_zip", "zip_with_evil_data_pkl",
           "raw_pickle", "exploit_in_hyper_parameters", "class_path_in_hyper_parameters",
           "nested_class_path_in_hyper_parameters", "safetensors_bad_header", "safetensors_huge_header",
           "pickle_named_safetensors", "truncated", "empty", "directory")


@pytest.fixture()
def traps(tmp_path, monkeypatch):
    """The crafted files, a marker path, and an importable module that also creates the marker when imported."""
    marker = tmp_path / "CODE_RAN"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / f"{MARKER_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(modules))
    monkeypatch.delitem(sys.modules, MARKER_MODULE, raising=False)
    files = tmp_path / "files"
    files.mkdir()
    yield crafted_files(files, marker), marker
    sys.modules.pop(MARKER_MODULE, None)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_every_crafted_file_is_listed(traps):
    files, _ = traps
    assert tuple(files) == CRAFTED


#: plain tensors, attacking only Lightning's reading of hyperparameters: weights loaders may accept them
HYPERPARAMETER_TRAPS = ("class_path_in_hyper_parameters", "nested_class_path_in_hyper_parameters")


@pytest.mark.parametrize("name", CRAFTED)
def test_load_state_dict_refuses(traps, name):
    files, marker = traps
    if name in HYPERPARAMETER_TRAPS:
        assert all(isinstance(value, torch.Tensor) for value in load_state_dict(files[name]).values())
    else:
        with pytest.raises(ValueError) as error:
            load_state_dict(files[name])
        assert "\n" not in str(error.value)
    assert not marker.exists() and MARKER_MODULE not in sys.modules


def cli_commands(path: Path, out: Path) -> dict[str, list[str]]:
    common = ["--config", CONFIG, "--trainer.logger=false", f"--trainer.default_root_dir={out}"]
    return {"defend": ["defend", *common, f"--checkpoint={path}", f"--output_dir={out}"],
            "test": ["test", *common, f"--ckpt_path={path}"],
            "fit": ["fit", *common, f"--ckpt_path={path}", "--trainer.max_epochs=1"]}


@pytest.mark.parametrize("command", ["defend", "test", "fit"])
@pytest.mark.parametrize("name", CRAFTED)
def test_cli_refuses_with_one_line(traps, tmp_path, capsys, name, command):
    files, marker = traps
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(cli_commands(files[name], out)[command])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lightning-backdoor: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    assert not marker.exists(), f"{name} ran code through {command}"
    assert MARKER_MODULE not in sys.modules
    assert not out.exists() and snapshot(tmp_path) == before


#: files whose payload is a pickle that would run code (the rest are malformed, not malicious)
PICKLE_TRAPS = ("lightning_dict", "bare_state_dict", "nested_in_list", "legacy_non_zip", "zip_with_evil_data_pkl",
                "raw_pickle", "exploit_in_hyper_parameters")


@pytest.mark.parametrize("name", PICKLE_TRAPS)
def test_ckpt_path_last_is_loaded_weights_only_too(traps, tmp_path, capsys, name):
    """``--ckpt_path last``: the run's newest last.ckpt is checked like an explicit path before Lightning loads it
    (itself with ``weights_only=True`` forced)."""
    files, marker = traps
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(files[name].read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", CONFIG, "--trainer.logger=false", f"--trainer.default_root_dir={run}",
              "--ckpt_path=last", "--trainer.enable_progress_bar=false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("lightning-backdoor: error: refusing")
    assert not marker.exists()
    assert sorted(path.name for path in run.rglob("*")) == ["checkpoints", "last.ckpt"]


def test_an_honest_checkpoint_still_loads_through_ckpt_path(quickstart_run, tmp_path, capsys):
    """The guard does not refuse what fit writes: ``test --ckpt_path`` on the run's own checkpoint scores it, in a
    folder that already holds a run, and leaves that run's files alone."""
    (tmp_path / "config.yaml").write_text("seed_everything: 0\n")
    main(["test", "--config", CONFIG, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
          f"--ckpt_path={quickstart_run / 'checkpoints' / 'poisoned.ckpt'}", "--trainer.enable_progress_bar=false"])
    assert "test/clean_acc" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == "seed_everything: 0\n"
