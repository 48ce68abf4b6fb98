"""bfloat16 only where the machine computes it natively: emulated, it is several times slower than float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_backdoor import precision
from lightning_backdoor.backdoor_cli import BackdoorCLI
from lightning_backdoor.precision import native_bf16, trainer_precision, use_bf16
from lightning_backdoor.provenance import environment
from lightning_backdoor.runs import training_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_trainer_precision_runs_in_float32_on_a_cpu_without_native_bf16(native, monkeypatch) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("cpu", "auto", None):
        assert trainer_precision("bf16-mixed", accelerator) == ("bf16-mixed" if native else "32-true")
        assert trainer_precision("bf16-true", accelerator) == ("bf16-true" if native else "32-true")
        assert trainer_precision("32-true", accelerator) == "32-true"  # only bfloat16 is replaced
        # Lightning runs 16-mixed as bf16-mixed on a CPU; 16-true is float16 throughout, not bfloat16
        assert trainer_precision("16-mixed", accelerator) == ("16-mixed" if native else "32-true")
        assert trainer_precision("16-true", accelerator) == "16-true"
    assert trainer_precision("bf16-mixed", "gpu") == "bf16-mixed"  # a GPU run is not the CPU's business
    assert trainer_precision("16-mixed", "gpu") == "16-mixed"
    assert use_bf16(None) is native and use_bf16(True) is True and use_bf16(False) is False


def test_native_bf16_reads_the_cpu_features(monkeypatch) -> None:
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value)
        assert native_bf16("cpu") is (avx512_bf16 or amx)
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    for features, expected in (({"fp", "asimd", "bf16"}, True), ({"fp", "asimd"}, False)):
        monkeypatch.setattr(precision, "_cpu_flags", lambda features=features: frozenset(features))
        assert native_bf16("cpu") is expected
    assert native_bf16("meta") is False
    assert environment()["native_bf16"] in (True, False)  # recorded with every run


def test_the_cpu_model_and_its_flags_are_read_from_cpuinfo(monkeypatch, tmp_path) -> None:
    """Seconds depend on the CPU: every run records its model name beside whether it computes bfloat16 natively."""
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\n"
                                      "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n")
    monkeypatch.setattr(precision, "Path", lambda path: tmp_path / "cpuinfo")
    precision._cpuinfo.cache_clear()
    try:
        assert precision.cpu_name() == "AMD EPYC 7B13"
        assert precision._cpu_flags() == {"fpu", "avx2", "fma"}
        assert environment()["cpu"] == "AMD EPYC 7B13"
    finally:
        precision._cpuinfo.cache_clear()


@pytest.mark.parametrize("native", [False, True])
def test_the_cli_trains_the_configs_bf16_in_float32_where_it_is_emulated(native, monkeypatch, caplog,
                                                                         tmp_path: Path) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli = BackdoorCLI(args=["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger=false",
                            f"--trainer.default_root_dir={tmp_path / 'run'}"], run=False)
    assert cli.config.trainer.precision == "bf16-mixed"  # config.yaml keeps the recipe (environment.json: what ran)
    assert cli.trainer.precision == ("bf16-mixed" if native else "32-true")
    # a training config's hash (the bench's cache key) does not depend on the machine
    assert training_config([ROOT / "configs" / "quickstart.yaml"], [])["trainer"]["precision"] == "bf16-mixed"
    said = "precision bf16-mixed -> 32-true: this CPU computes bfloat16 only by emulation" in caplog.text
    assert said is not native
    assert not (tmp_path / "run").exists()  # nothing written by setting up
    # the CPU given as an Accelerator object (a class_path) is the CPU too
    cli = BackdoorCLI(args=["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger=false",
                            "--trainer.accelerator={class_path: lightning.pytorch.accelerators.CPUAccelerator}",
                            f"--trainer.default_root_dir={tmp_path / 'run'}"], run=False)
    assert cli.trainer.precision == ("bf16-mixed" if native else "32-true")
