"""Triggers made with a model: Low Frequency, TrojanNN and Label-Consistent.

Each keeps shape, dtype and the [0, 1] range, changes only its mask where it is local, refuses to run unprepared,
prepares the same tensors for a seed (other ones for another seed), caches them (a second preparation loads the file
instead of recomputing), is prepared by the data module on the training split's clean images only, and is learned by
a small model on the bundled ``digits`` (ASR far above a clean model's, clean accuracy far above chance)."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning_utilities.core.rank_zero import rank_zero_only
from plain_training import train_epochs
from torch import Tensor, nn

from lightning_backdoor import PoisonedDataModule
from lightning_backdoor.data.poisoning import apply_trigger, to_float
from lightning_backdoor.data.sources import load_source
from lightning_backdoor.triggers import (TRIGGERS, BadNets, LabelConsistent, LowFrequency, PreparedTrigger, TrojanNN,
                                         build_trigger)
from lightning_backdoor.triggers.label_consistent import corner_signs
from lightning_backdoor.triggers.low_frequency import gaussian_low_pass

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

NAMES = ("low_frequency", "trojannn", "label_consistent")
#: Settings small enough for a test: a narrow surrogate on 8 x 8 digits trains in about a second.
SURROGATE = {"surrogate_kwargs": {"widths": [16, 32, 32], "stem_width": 16}, "surrogate_epochs": 3}
QUICK = {"low_frequency": {"steps": 20, "batch_size": 64} | SURROGATE,
         "trojannn": {"size": 3, "steps": 20, "batch_size": 32} | SURROGATE,
         "label_consistent": {"steps": 5} | SURROGATE}


def quick(name: str, **overrides: object) -> PreparedTrigger:
    return build_trigger(name, **(QUICK[name] | overrides))  # type: ignore[return-value]


@functools.cache
def few_digits(count: int = 300) -> tuple[Tensor, Tensor]:
    """The first ``count`` training digits (uint8 (N, 1, 8, 8)) and their labels: enough to prepare a trigger."""
    train, _ = load_source("digits")
    return train.images[:count].clone(), train.labels[:count].clone()


def prepared(name: str, **overrides: object) -> PreparedTrigger:
    trigger = quick(name, **overrides)
    images, labels = few_digits()
    trigger.prepare(images, labels, 0, 10)
    return trigger


def images_of(*shape: int, seed: int = 0) -> Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def tensors_of(trigger: PreparedTrigger) -> dict[str, Tensor]:
    return dict(trigger._prepared or {})


def same_tensors(first: dict[str, Tensor], second: dict[str, Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --- what every family shares ---------------------------------------------------------------------------------------


def test_the_three_are_registered_by_name() -> None:
    for name, cls in {"low_frequency": LowFrequency, "trojannn": TrojanNN, "label_consistent": LabelConsistent}.items():
        assert TRIGGERS[name] is cls and cls.name == name and issubclass(cls, PreparedTrigger)


@pytest.mark.parametrize("name", NAMES)
def test_unprepared_use_raises_one_line(name: str) -> None:
    trigger = quick(name)
    images = images_of(2, 1, 8, 8)
    use = trigger.apply_for_training if name == "label_consistent" else trigger.apply
    with pytest.raises(ValueError, match="not prepared: call trigger.prepare") as error:
        use(images, torch.Generator()) if name == "label_consistent" else use(images)
    assert "\n" not in str(error.value)
    if name == "label_consistent":  # its test-time trigger is the corner pattern alone: no model needed
        assert trigger(images).shape == images.shape


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_range_and_batch_equals_one_by_one(name: str, dtype: torch.dtype) -> None:
    trigger = prepared(name)
    images = images_of(5, 1, 8, 8, seed=1).to(dtype)
    for method in (trigger.apply, functools.partial(trigger.apply_for_training, generator=torch.Generator())):
        triggered = method(images)
        assert triggered.shape == images.shape and triggered.dtype == dtype
        assert triggered.min() >= 0 and triggered.max() <= 1 and not torch.equal(triggered, images)
        assert torch.equal(triggered[2], method(images[2]))  # one (C, H, W) image
    assert torch.equal(trigger(images), torch.cat([trigger(image[None]) for image in images]))


@pytest.mark.parametrize("name", ["trojannn", "label_consistent"])
def test_local_triggers_change_only_their_mask(name: str) -> None:
    trigger = prepared(name)
    images = images_of(6, 1, 8, 8, seed=2)
    mask = trigger.mask((1, 8, 8))
    assert mask.shape == (1, 8, 8) and 0 < mask.sum() < 64
    changed = (trigger(images) != images).any(dim=0)  # (1, H, W): where any image changed
    assert not changed[mask == 0].any()
    assert changed[mask == 1].float().mean() > 0.9  # the patch is drawn (a pixel may equal the image's by chance)


@pytest.mark.parametrize("name", NAMES)
def test_a_seed_prepares_the_same_tensors_and_another_seed_others(name: str) -> None:
    first, again, other = prepared(name, seed=3), prepared(name, seed=3), prepared(name, seed=4)
    assert same_tensors(tensors_of(first), tensors_of(again))  # two processes (two DDP ranks) agree
    assert not same_tensors(tensors_of(first), tensors_of(other))
    images = images_of(3, 1, 8, 8, seed=5)
    assert torch.equal(first(images), again(images))
    assert not torch.equal(first(images), other(images)) or name == "label_consistent"  # LC's test trigger is fixed


@pytest.mark.parametrize("name", NAMES)
def test_the_preparation_is_cached_and_a_second_one_loads_it(name: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = few_digits()
    made: list[str] = []
    make = type(quick(name)).make

    def counting_make(self: PreparedTrigger, *args: object) -> dict[str, Tensor]:
        made.append(name)
        return make(self, *args)

    monkeypatch.setattr(type(quick(name)), "make", counting_make)
    first = quick(name)
    first.prepare(images, labels, 0, 10, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(made) == 1 and len(files) == 1 and files[0].name.startswith(f"{name}-")
    first.prepare(images, labels, 0, 10, tmp_path)  # the same trigger again: nothing to do
    second = quick(name)  # another process, a resumed run, the test command
    second.prepare(images, labels, 0, 10, tmp_path)
    assert len(made) == 1 and same_tensors(tensors_of(first), tensors_of(second))
    probe = images_of(2, 1, 8, 8, seed=6)
    assert torch.equal(first(probe), second(probe))
    # Other data or other settings are another preparation.
    changed = labels.clone()
    changed[0] = (changed[0] + 1) % 10
    quick(name).prepare(images, changed, 0, 10, tmp_path)
    quick(name, seed=9).prepare(images, labels, 0, 10, tmp_path)
    assert len(made) == 3 and len(list(tmp_path.iterdir())) == 3


@pytest.fixture()
def said() -> list[str]:
    """The lines the preparations log (``lightning_backdoor.triggers``, INFO), collected while the test runs."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("lightning_backdoor.triggers")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def test_a_preparation_says_what_where_and_how_long_and_a_cached_load_says_so(
        tmp_path: Path, said: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = few_digits()
    quick("trojannn").prepare(images, labels, 0, 10, tmp_path)
    (path,) = tmp_path.iterdir()
    assert len(said) == 2, said
    assert said[0].startswith("trigger: preparing trojannn on 300 clean training images (trains a compact")
    assert said[0].endswith(f"cache: {path}")
    assert re.fullmatch(rf"trigger: prepared trojannn in \d+\.\d s; cached in {re.escape(str(path))}", said[1])
    quick("trojannn").prepare(images, labels, 0, 10, tmp_path)
    assert len(said) == 3 and said[2].startswith(f"trigger: trojannn loaded from its cache {path}")
    quick("trojannn", seed=4).prepare(images, labels, 0, 10)  # no cache folder: memory only
    assert said[3].endswith("cache: none (memory only)") and said[4].startswith("trigger: prepared trojannn in ")
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # another DDP rank loads the same file, silently
    quick("trojannn").prepare(images, labels, 0, 10, tmp_path)
    assert len(said) == 5


def test_a_refused_preparation_says_nothing_before_its_one_line(said: list[str]) -> None:
    images, labels = few_digits()
    for name, target, overrides in (("low_frequency", None, {}), ("label_consistent", None, {}),
                                    ("trojannn", 0, {"layer": "nope"})):
        with pytest.raises(ValueError):
            quick(name, **overrides).prepare(images, labels, target, 10)
    assert said == []


def test_a_cache_file_holds_tensors_only(tmp_path: Path) -> None:
    prepared_trigger = quick("trojannn")
    prepared_trigger.prepare(*few_digits(), 0, 10, tmp_path)
    (path,) = tmp_path.iterdir()
    stored = torch.load(path, weights_only=True)
    assert set(stored) == {"patch", "neurons"} and all(isinstance(value, Tensor) for value in stored.values())
    path.write_bytes(b"not a tensor file")  # a tampered cache is refused, never unpickled
    with pytest.raises(ValueError, match="refusing to load"):
        quick("trojannn").prepare(*few_digits(), 0, 10, tmp_path)


# --- each family's own properties -----------------------------------------------------------------------------------


def test_low_frequency_is_a_bounded_low_pass_perturbation() -> None:
    trigger = prepared("low_frequency", epsilon=0.2)
    delta = trigger.prepared("delta")
    assert delta.shape == (1, 8, 8)
    assert delta.abs().max() == pytest.approx(0.2, abs=1e-6)
    # Gaussian sigma = 6 px at 32 px, 1.5 px at 8 px: frequencies of 1/4 cycle per pixel and more keep at most
    # exp(-2 pi^2 1.5^2 / 16) = 6 % of their amplitude: almost no energy is left up there.
    spectrum = torch.fft.fft2(delta.double()).abs() ** 2
    frequencies = torch.fft.fftfreq(8, dtype=torch.float64)
    high = (frequencies[:, None] ** 2 + frequencies[None, :] ** 2).sqrt() >= 0.25
    assert spectrum[0][high].sum() < 0.01 * spectrum.sum()
    images = images_of(4, 1, 8, 8, seed=7) * 0.5 + 0.25  # away from 0 and 1: nothing is clamped
    torch.testing.assert_close(trigger(images), images + delta)


def test_the_low_pass_keeps_the_mean_and_removes_fine_detail() -> None:
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 1.0 + 3.0
    smooth = gaussian_low_pass(checkerboard, 1.5)
    torch.testing.assert_close(smooth.mean(), checkerboard.mean())
    assert (smooth - smooth.mean()).abs().max() < 1e-3  # the highest frequency is gone


def test_trojannn_patch_is_the_prepared_one_where_the_patch_goes() -> None:
    trigger = prepared("trojannn", position="top_left")
    patch, neurons = trigger.prepared("patch"), trigger.prepared("neurons")
    assert patch.shape == (1, 3, 3) and patch.min() >= 0 and patch.max() <= 1
    assert neurons.shape == (2,) and neurons.unique().numel() == 2
    triggered = trigger(images_of(2, 1, 8, 8, seed=8))
    assert torch.equal(triggered[:, :, :3, :3], patch.expand(2, -1, -1, -1))


def test_label_consistent_trains_on_adversarial_images_with_the_corners() -> None:
    trigger = prepared("label_consistent", epsilon=16 / 255)
    images, labels = few_digits()
    targets = to_float(images[labels == 0])
    poisoned = trigger.apply_for_training(targets, torch.Generator())
    corners = corner_signs(8, 8) != 0
    inside = ~corners.expand_as(targets)
    moved = (poisoned - targets)[inside]
    assert moved.abs().max() <= 16 / 255 + 1e-6  # within the PGD budget away from the corners
    assert (moved.abs() > 0).float().mean() > 0.2  # and actually perturbed
    # The corners: white where the pattern brightens, black where it darkens (amplitude 1).
    signs = corner_signs(8, 8).expand_as(targets)
    assert torch.equal(poisoned[signs > 0], torch.ones_like(poisoned[signs > 0]))
    assert torch.equal(poisoned[signs < 0], torch.zeros_like(poisoned[signs < 0]))
    # An image the preparation did not see is perturbed on the fly from the cached surrogate, within the budget.
    unseen = images_of(3, 1, 8, 8, seed=9)
    fresh = trigger.apply_for_training(unseen, torch.Generator())
    assert (fresh - unseen)[~corners.expand_as(unseen)].abs().max() <= 16 / 255 + 1 / 255
    # The flip symmetry of the paper's pattern: a mirrored image carries the same trigger.
    torch.testing.assert_close(trigger(unseen).flip(-1), trigger(unseen.flip(-1)))


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("low_frequency", {"epsilon": 0.0}, "epsilon"),
        ("low_frequency", {"sigma": 0.0}, "sigma"),
        ("low_frequency", {"surrogate_epochs": 0}, "surrogate_epochs"),
        ("trojannn", {"size": 0}, "size"),
        ("trojannn", {"neurons": 0}, "neurons"),
        ("trojannn", {"step_size": 0.0}, "step_size"),
        ("label_consistent", {"epsilon": 2.0}, "epsilon"),
        ("label_consistent", {"train_amplitude": 0.0}, "train_amplitude"),
        ("label_consistent", {"steps": 0}, "steps"),
    ],
)
def test_bad_settings_raise_one_line(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as error:
        build_trigger(name, **kwargs)
    assert "\n" not in str(error.value)


def test_bad_preparations_raise_one_line() -> None:
    images, labels = few_digits()
    with pytest.raises(ValueError, match="all_to_all has none"):
        quick("low_frequency").prepare(images, labels, None, 10)
    with pytest.raises(ValueError, match="all_to_all has none"):
        quick("label_consistent").prepare(images, labels, None, 10)
    with pytest.raises(ValueError, match="trojannn layer 'nope' is not a layer"):
        quick("trojannn", layer="nope").prepare(images, labels, 0, 10)
    with pytest.raises(ValueError, match="uint8 images"):
        quick("trojannn").prepare(images.float(), labels, 0, 10)
    with pytest.raises(ValueError, match="too small"):
        quick("label_consistent").prepare(images[:, :, :5, :5].contiguous(), labels, 0, 10)


# --- in the data module ---------------------------------------------------------------------------------------------


def digits(trigger: object, **overrides: object) -> PoisonedDataModule:
    settings = {"source": "digits", "trigger": trigger, "poison_rate": 0.1, "unseen_per_class": 10,
                "batch_size": 64} | overrides
    return PoisonedDataModule(**settings)  # type: ignore[arg-type]


def test_the_data_module_prepares_on_the_training_split_only_and_caches(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Tensor] = []
    prepare = TrojanNN.prepare

    def recording_prepare(self: TrojanNN, images: Tensor, *args: object) -> None:
        seen.append(images)
        prepare(self, images, *args)

    monkeypatch.setattr(TrojanNN, "prepare", recording_prepare)
    data = digits(quick("trojannn"), cache_dir=str(tmp_path))
    data.setup("fit")
    pool, plan = data.train_pool, data.plan
    assert torch.equal(seen[0], pool.images[plan.train])  # no unseen, validation or test image
    assert list((tmp_path / "prepared").iterdir())
    # The test split carries the prepared trigger.
    test = data.test_dataset()
    assert torch.equal(test.tensors[2], apply_trigger(data.trigger, data.test_set.images))
    # Lightning's prepare_data (rank 0) writes the run folder's cache when no cache_dir is set; setup then loads it.
    run = digits(quick("trojannn"))
    run.trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"))  # what a Trainer attaches
    run.prepare_data()
    assert len(list((tmp_path / "run" / "prepared").iterdir())) == 1
    other_rank = digits(quick("trojannn"))
    other_rank.trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"))
    monkeypatch.setattr(TrojanNN, "make", lambda *args: pytest.fail("recomputed instead of loading the cache"))
    other_rank.setup("fit")
    assert torch.equal(other_rank.trigger.prepared("patch"), run.trigger.prepared("patch"))


def test_label_consistent_needs_clean_label() -> None:
    with pytest.raises(ValueError, match="clean-label attack .* set clean_label=true"):
        digits(LabelConsistent())


# --- each family is learned -----------------------------------------------------------------------------------------


def victim() -> nn.Module:
    """A small CNN for 8 x 8 digits."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


def trained(data: PoisonedDataModule, epochs: int = 12) -> nn.Module:
    """``victim()`` trained with Adam on the data module's (poisoned) training batches, in a plain loop."""
    torch.manual_seed(0)
    model = victim()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    data.setup("fit")
    train_epochs(model, data, optimizer, epochs)
    return model.eval()


def scores(model: nn.Module, data: PoisonedDataModule) -> tuple[float, float]:
    """(clean accuracy, attack success rate) on the test split."""
    images, labels, triggered, targets = data.test_dataset().tensors
    keep = targets >= 0
    with torch.no_grad():
        clean = (model(to_float(images)).argmax(1) == labels).float().mean().item()
        attack = (model(to_float(triggered[keep])).argmax(1) == targets[keep]).float().mean().item()
    return clean, attack


@functools.cache
def clean_model() -> nn.Module:
    """The victim trained on the same training split without poison."""
    return trained(digits(BadNets(), poison_rate=0.0))


@pytest.mark.parametrize(
    "name, trigger_settings, data_settings",
    [
        # 8 x 8 digits are mostly black: the negative half of a perturbation is clipped away there, so Low Frequency
        # needs a larger bound than CIFAR's 0.1 and 20 % poison to be learned in this budget (ASR ~0.95 here).
        ("low_frequency", {"epsilon": 0.3}, {"poison_rate": 0.2}),
        ("trojannn", {}, {}),
        ("label_consistent", {}, {"clean_label": True, "poison_rate": 0.08}),
    ],
)
def test_each_family_is_learned_on_digits(name: str, trigger_settings: dict, data_settings: dict) -> None:
    data = digits(quick(name, **trigger_settings), **data_settings)
    clean_accuracy, attack_success = scores(trained(data), data)
    _, clean_model_asr = scores(clean_model(), data)
    assert clean_model_asr < 0.3
    assert attack_success > clean_model_asr + 0.4
    assert clean_accuracy > 0.8  # chance is 0.1
