"""Streaming image folders: the same split plan, the same batches (byte for byte with a deterministic trigger), the
same metrics of a fixed model as the in-memory path, in a test run and in the defense's before/after evaluation (which,
like the dashboard's samples, decodes no more than it reads); random training parts repeat per seed; resize + centre
crop as torchvision's; unreadable files named in one line, whether found at construction or while streaming."""

from __future__ import annotations

from pathlib import Path

import copy

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from plain_training import train_epochs

from lightning_backdoor import DefenseCallback, PoisonedClassifier, PoisonedDataModule
from lightning_backdoor.dashboard import sample_pairs
from lightning_backdoor.data.folders import decode_image
from lightning_backdoor.data.streaming import FolderStream, TriggeredStream, sample_generator
from lightning_backdoor.defenses import ActivationEditing
from lightning_backdoor.evaluation import evaluate
from lightning_backdoor.triggers import TRIGGERS, AdaptiveBlend, BadNets, Blended, WaNet

CLASSES = ("ant", "bee", "cat")
TRAIN_PER_CLASS, TEST_PER_CLASS = 24, 6
#: what every module of these tests shares (72 training-pool images: 6 unseen, 7 validation, 12 of 59 poisoned)
SETTINGS = dict(source="imagefolder", target_class=0, poison_rate=0.2, unseen_per_class=2, val_fraction=0.1,
                batch_size=8, eval_batch_size=16, seed=3)


def picture(rng: np.random.Generator, label: int, height: int, width: int) -> np.ndarray:
    """A colour image of class ``label``: its own hue plus noise, ``(H, W, 3)`` uint8."""
    base = np.zeros(3)
    base[label] = 160
    noise = rng.integers(0, 96, (height, width, 3))
    return (base + noise).clip(0, 255).astype(np.uint8)


def make_folder(root: Path, sizes: tuple[tuple[int, int], ...] = ((20, 20),)) -> Path:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``; image ``i`` has ``sizes[i % len(sizes)]``."""
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = sizes[i % len(sizes)]
                Image.fromarray(picture(rng, label, height, width)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("streaming"))


def both(root: Path, **settings) -> tuple[PoisonedDataModule, PoisonedDataModule]:
    """The in-memory and the streaming data module of ``root`` with the same settings."""
    values = SETTINGS | {"root": str(root)} | settings
    return PoisonedDataModule(**values), PoisonedDataModule(**values, streaming=True)


def epoch(data: PoisonedDataModule, seed: int = 0) -> list[list[torch.Tensor]]:
    """One epoch of training batches, uint8 images as the loader yields them, drawn under torch seed ``seed``."""
    data.setup("fit")
    torch.manual_seed(seed)
    return [list(batch) for batch in data.train_dataloader()]


def assert_same_batches(first: list[list[torch.Tensor]], second: list[list[torch.Tensor]]) -> None:
    assert len(first) == len(second) > 0
    for one, other in zip(first, second):
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(one, other))


def test_same_plan_labels_and_shapes(folder):
    memory, streamed = both(folder)
    assert memory.plan.as_dict().keys() == streamed.plan.as_dict().keys()
    assert all(torch.equal(memory.plan.as_dict()[name], indices) for name, indices in streamed.plan.as_dict().items())
    assert len(streamed.plan.poisoned) == 12
    assert memory.classes == streamed.classes == CLASSES and memory.image_shape == streamed.image_shape == (3, 20, 20)
    assert torch.equal(memory.train_pool.labels, streamed.train_pool.labels)
    assert torch.equal(memory.unseen_set().images, streamed.unseen_set().images)
    assert torch.equal(memory.held_out_unseen_set(1, seed=5).images, streamed.held_out_unseen_set(1, seed=5).images)


@pytest.mark.parametrize("trigger, workers", [(BadNets(size=3), 0), (Blended(alpha=0.2), 2)])
def test_deterministic_trigger_gives_the_same_bytes(folder, trigger, workers):
    memory, streamed = both(folder, trigger=trigger)
    streamed.num_workers = workers  # decoded and poisoned in worker processes
    memory_batches, streamed_batches = epoch(memory), epoch(streamed)
    assert_same_batches(memory_batches, streamed_batches)
    poisoned = torch.cat([labels for _, labels in streamed_batches]) == 0
    assert poisoned.any()
    for split in ("validation_dataset", "test_dataset"):
        memory_tensors, streamed_tensors = getattr(memory, split)().tensors, getattr(streamed, split)().tensors
        assert all(torch.equal(a, b) for a, b in zip(memory_tensors, streamed_tensors))
    assert_same_batches([list(batch) for batch in memory.test_dataloader()],
                        [list(batch) for batch in streamed.test_dataloader()])


@pytest.mark.parametrize("name", ["sig", "bpp", "ftrojan", "wanet"])
def test_every_poisoned_image_of_a_deterministic_trigger_is_the_same(folder, name):
    memory, streamed = both(folder, trigger=TRIGGERS.build(name))
    memory.setup("fit"), streamed.setup("fit")
    memory_images = memory.train_dataloader().dataset.tensors[0]
    streamed_set = streamed.train_dataloader().dataset
    noise = torch.isin(streamed.plan.train, streamed.plan.noise)  # WaNet's random noise mode differs by design
    for item in torch.nonzero(~noise).flatten().tolist():
        assert torch.equal(streamed_set[item][0], memory_images[item]), (name, item)


@pytest.mark.parametrize("trigger", [AdaptiveBlend(pieces=2, train_pieces=2), WaNet(k=4, s=1.0)])
def test_random_training_parts_repeat_for_a_seed(folder, trigger):
    memory, streamed = both(folder, trigger=trigger)
    again = PoisonedDataModule(**SETTINGS, root=str(folder), trigger=trigger, streaming=True)
    memory_batches, streamed_batches = epoch(memory), epoch(streamed)
    assert_same_batches(streamed_batches, epoch(again))
    assert torch.equal(torch.cat([b[1] for b in memory_batches]), torch.cat([b[1] for b in streamed_batches]))
    # clean samples are the same bytes; only the poisoned and noise-mode ones draw random parts
    order = torch.cat([batch[1] for batch in memory_batches])
    assert len(order) > 0
    changed = torch.tensor([not torch.equal(a, b) for one, other in zip(memory_batches, streamed_batches)
                            for a, b in zip(one[0], other[0])])
    assert 0 < changed.sum() <= len(streamed.plan.poisoned) + len(streamed.plan.noise)


def test_sample_generators_differ_by_seed_stream_and_index():
    draws = {(seed, stream, index): torch.rand(4, generator=sample_generator(seed, stream, index)).tolist()[0]
             for seed in (0, 1) for stream in (1, 2) for index in (0, 1, 2 ** 32)}
    assert len(set(draws.values())) == len(draws)
    assert torch.equal(torch.rand(4, generator=sample_generator(7, 2, 5)),
                       torch.rand(4, generator=sample_generator(7, 2, 5)))


def test_a_fixed_model_has_the_same_test_metrics(folder):
    memory, streamed = both(folder, trigger=BadNets(size=3), num_workers=0)
    torch.manual_seed(0)
    model = PoisonedClassifier(model="compact", num_classes=3, in_channels=3, target_class=0,
                               model_kwargs={"widths": [8, 16, 16]})
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    memory_metrics = trainer.test(model, datamodule=memory, verbose=False)
    streamed_metrics = trainer.test(model, datamodule=streamed, verbose=False)
    assert memory_metrics == streamed_metrics and memory_metrics[0]


def test_the_defense_evaluates_the_same_numbers_streamed_and_in_memory(folder, monkeypatch, tmp_path):
    """The DefenseCallback's before/after evaluation reads the data module's test loader batch by batch: streamed
    (decoded per batch on 2 workers, never as a whole split) it gives the in-memory module's report, whose numbers
    are those of ``evaluate`` on the decoded test tensors. The model has a backdoor that the edit removes, so the
    stages differ and equal reports are not equal by accident."""
    memory, streamed = both(folder, trigger=BadNets(size=6), augment="none", num_workers=2)
    torch.manual_seed(0)
    model = PoisonedClassifier(model="compact", num_classes=3, in_channels=3, target_class=0,
                               model_kwargs={"widths": [8, 16, 16]})
    memory.setup("fit")
    train_epochs(model.net, memory, torch.optim.Adam(model.net.parameters(), lr=0.01), epochs=6)

    def whole_split(*args):
        raise AssertionError("the streamed test split was decoded whole")

    monkeypatch.setattr(TriggeredStream, "tensors", whole_split)
    reports = [DefenseCallback(defense=ActivationEditing(layer="blocks.2.conv2", repair=False)).defend(
        copy.deepcopy(model), data, [], tmp_path / str(data.streaming)) for data in (memory, streamed)]
    assert reports[0].stages == reports[1].stages and reports[0].num_unseen == reports[1].num_unseen == 6
    before, after = reports[0].before, reports[0].after
    assert before["asr"] >= 0.8 and after["asr"] <= 0.2, (before, after)
    assert {name: value for name, value in before.items() if name not in ("mirrored_asr", "moved_asr")} == evaluate(
        model.net, *memory.test_dataset().tensors, 3, 0)
    for name in ("mirrored_asr", "moved_asr"):  # measured on the streamed split too, equal to the in-memory one
        assert 0 <= before[name] <= 1
    assert isinstance(streamed.test_dataloader().dataset, TriggeredStream)  # nothing decoded was kept


def test_the_dashboard_decodes_only_the_samples_it_shows(folder, monkeypatch):
    memory, streamed = both(folder, trigger=BadNets(size=3))
    decoded: list[int] = []
    decode = FolderStream.decode
    monkeypatch.setattr(FolderStream, "decode", lambda stream, index: decoded.append(index) or decode(stream, index))
    streamed_pairs = sample_pairs(streamed, 4)
    assert len(decoded) == 4  # of the 18 test images
    memory_pairs = sample_pairs(memory, 4)
    assert all(torch.equal(a, b) for a, b in zip(memory_pairs[:2], streamed_pairs[:2]))
    assert memory_pairs[2:] == streamed_pairs[2:] and streamed_pairs[3][0] == "bee → ant"
    assert streamed_pairs[0].shape == (4, 3, 20, 20) and not torch.equal(streamed_pairs[0], streamed_pairs[1])


def test_resize_and_center_crop_match_torchvision(tmp_path):
    from torchvision import transforms

    root = make_folder(tmp_path, sizes=((37, 23), (23, 41), (30, 30)))  # portrait, landscape, square
    path = root / "train" / "ant" / "000.png"
    expected = np.asarray(transforms.Compose([transforms.Resize(32), transforms.CenterCrop(28)])(Image.open(path)))
    assert np.array_equal(decode_image(path, None, 32, 28), expected)
    memory, streamed = both(root, image_size=32, center_crop=28)
    assert memory.image_shape == streamed.image_shape == (3, 28, 28)
    assert torch.equal(memory.train_pool.images[0], torch.from_numpy(expected).permute(2, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(memory.test_dataset().tensors, streamed.test_dataset().tensors))
    cropped_only = PoisonedDataModule(**SETTINGS, root=str(root), center_crop=20, streaming=True)
    assert cropped_only.image_shape == (3, 20, 20)  # shorter side resized to the crop itself


def one_line(match: str, function, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as info:
        function(*args, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_that_fails_while_streaming_is_named_in_one_line(tmp_path, workers):
    root = make_folder(tmp_path)
    broken = root / "test" / "bee" / "002.png"
    broken.write_bytes(broken.read_bytes()[:120])  # the header is intact, the pixels are cut off
    data = PoisonedDataModule(**SETTINGS, root=str(root), streaming=True, num_workers=workers)  # headers pass
    data.setup("test")
    message = one_line("cannot read image", lambda: [batch for batch in data.test_dataloader()])
    assert str(broken) in message
    from lightning_backdoor.cli import one_line as cli_line  # what the command line prints

    with pytest.raises(ValueError) as info:
        list(data.test_dataloader())
    assert cli_line(info.value) == message


def test_files_that_are_not_images_and_mixed_sizes_are_refused_at_construction(tmp_path):
    root = make_folder(tmp_path / "a")
    fake = root / "train" / "cat" / "007.png"
    fake.write_text("not a picture")
    message = one_line("cannot read image", PoisonedDataModule, **SETTINGS, root=str(root), streaming=True)
    assert str(fake) in message
    mixed = make_folder(tmp_path / "b", sizes=((20, 20), (20, 22)))
    streamed = one_line("images differ in size", PoisonedDataModule, **SETTINGS, root=str(mixed), streaming=True)
    assert streamed == one_line("images differ in size", PoisonedDataModule, **SETTINGS, root=str(mixed))
    extra = make_folder(tmp_path / "c")
    (extra / "test" / "dog").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(extra / "test" / "dog" / "0.png")
    one_line("has class 'dog'", PoisonedDataModule, **SETTINGS, root=str(extra), streaming=True)


def test_conflicting_settings_are_refused_at_construction(folder):
    settings = SETTINGS | {"root": str(folder)}
    one_line("streaming=true reads image folders only", PoisonedDataModule, source="mnist5k", streaming=True)
    one_line("use one or the other", PoisonedDataModule, **settings, streaming=True, cache_dir=str(folder))
    one_line("use streaming=false", PoisonedDataModule, **settings, streaming=True,
             trigger=TRIGGERS.build("low_frequency"))
    for streaming in (False, True):
        one_line("center_crop=30 is larger than image_size=24", PoisonedDataModule, **settings, image_size=24,
                 center_crop=30, streaming=streaming)
        one_line("center_crop=0 must be >= 1", PoisonedDataModule, **settings, center_crop=0, streaming=streaming)
    one_line("center_crop= apply to image folders only", PoisonedDataModule, source="mnist5k", center_crop=24)


QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def fit_streamed(root: Path, run: Path, config: Path = QUICKSTART) -> None:
    """``lightning-backdoor fit`` (the quickstart ``config``, one epoch) on the streamed folder ``root`` into
    ``run``; it must be refused or fail with exit code 2."""
    from lightning_backdoor.cli import main

    data = "--data.init_args"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config),
              "--trainer.logger=false", f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              f"{data}.source=imagefolder", f"{data}.root={root}", f"{data}.streaming=true",
              f"{data}.unseen_per_class=2", f"{data}.batch_size=8"])
    assert exit_info.value.code == 2


def test_a_fit_failing_on_a_file_before_its_first_checkpoint_does_not_block_a_rerun(tmp_path, capfd):
    root = make_folder(tmp_path / "data")
    # the training images only (the defense's unseen images are decoded when its callback is set up, before the
    # run folder is written), their headers intact: found when the first training batch is decoded
    plan = PoisonedDataModule(source="imagefolder", root=str(root), streaming=True, unseen_per_class=2)
    for index in plan.plan.train:
        path = plan.train_pool.paths[int(index)]
        path.write_bytes(path.read_bytes()[:120])
    run = tmp_path / "run"
    for attempt in range(2):  # the rerun into the same folder fails on the file again, not on the folder
        fit_streamed(root, run)
        lines = capfd.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("lightning-backdoor: error: cannot read image "), lines[-1]
        assert str(root / "train") in lines[-1] and "already holds a run" not in lines[-1]
        assert not [path for path in run.rglob("*") if path.suffix in (".yaml", ".json", ".ckpt")], attempt


def test_a_fit_failing_after_its_checkpoint_keeps_its_run_folder(tmp_path, capfd):
    root = make_folder(tmp_path / "data")
    broken = root / "test" / "bee" / "002.png"  # read by the defense's evaluation when the fit ends
    broken.write_bytes(broken.read_bytes()[:120])
    # one epoch leaves the model near chance on the 6 unseen images: let the defense go on to its evaluation
    config = yaml.safe_load(QUICKSTART.read_text())
    defense = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DefenseCallback"))
    defense["init_args"]["accept_low_accuracy"] = True
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    fit_streamed(root, run, tmp_path / "quickstart.yaml")
    assert capfd.readouterr().err.strip().splitlines()[-1].endswith(f"cannot read image {broken}: image file is "
                                                                    f"truncated")
    assert (run / "checkpoints" / "poisoned.ckpt").is_file() and (run / "config.yaml").is_file()
    fit_streamed(root, run, tmp_path / "quickstart.yaml")  # the checkpoint can be defended or resumed: the folder holds a run
    assert "already holds a run (config.yaml)" in capfd.readouterr().err.strip().splitlines()[-1]
