"""``defend --unseen_root DIR --test_root DIR``: the defender's own clean images (ImageFolder trees) replace the data
module's unseen and test splits; class folders are matched to the model's classes by name (the data module's, or
``--classes``); a mistake is one line, exit code 2, nothing written. The quickstart model is 98-99 % accurate and
its backdoor ~100 % successful, so the bounds below are far from any run's rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_backdoor.cli import main
from lightning_backdoor.data import PoisonedDataModule
from lightning_backdoor.data.imageset import ImageSet

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.yaml")
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: a fixed layer and no repair: a few seconds per defense
FAST = ["--defense.init_args.layer=blocks.2.conv2", "--defense.init_args.repair=false"]


def write_folder(folder: Path, images: ImageSet, names: tuple[str, ...]) -> Path:
    """Save ``images`` as ``folder/<names[label]>/<index>.png``."""
    for index, (image, label) in enumerate(zip(images.images, images.labels.tolist())):
        (folder / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / names[label] / f"{index:04d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Clean MNIST images as ImageFolder trees: 2 unseen and 10 test images per class, with the data module's class
    names (``0``..``9``), spelled-out names, and with every digit filed under the next digit's folder."""
    root = tmp_path_factory.mktemp("own")
    data = PoisonedDataModule()
    digits = tuple(data.classes)
    test = data.test_set
    test = test.subset(torch.cat([torch.nonzero(test.labels == label).flatten()[:10] for label in range(10)]))
    shifted = digits[1:] + digits[:1]
    return {"unseen": write_folder(root / "unseen", data.unseen_set(2), digits),
            "test": write_folder(root / "test", test, digits),
            "unseen_named": write_folder(root / "unseen_named", data.unseen_set(2), NAMES),
            "test_named": write_folder(root / "test_named", test, NAMES),
            "unseen_shifted": write_folder(root / "unseen_shifted", data.unseen_set(2), shifted),
            "test_shifted": write_folder(root / "test_shifted", test, shifted)}


def defend(quickstart_run: Path, out: Path, *arguments: str) -> dict:
    main(["defend", "--config", CONFIG, "--trainer.logger=false", f"--output_dir={out}",
          f"--checkpoint={quickstart_run / 'checkpoints' / 'poisoned.ckpt'}", *FAST, *arguments])
    return json.loads((out / "defense_report.json").read_text())


@pytest.mark.parametrize("unseen, test, classes, accurate", [
    ("unseen", "test", None, True),
    ("unseen_named", "test_named", NAMES, True),
    ("unseen", "test_shifted", None, False),  # the folders' labels are used: every test image is "wrong"
])
def test_own_images_replace_the_unseen_and_test_splits(quickstart_run, folders, tmp_path, unseen, test, classes,
                                                       accurate):
    arguments = [f"--unseen_root={folders[unseen]}", f"--test_root={folders[test]}"]
    if classes is not None:
        arguments.append(f"--classes=[{', '.join(classes)}]")
    report = defend(quickstart_run, tmp_path / "out", *arguments)
    assert report["defense"]["num_unseen"] == 20
    before = report["before"]
    assert len(before["per_class_acc"]) == 10
    assert before["clean_acc"] > 0.9 if accurate else before["clean_acc"] < 0.2
    if accurate:  # the test images were triggered with the data module's trigger toward its target
        assert before["asr"] > 0.9


def test_unseen_images_with_wrong_labels_need_accept_low_accuracy(quickstart_run, folders, tmp_path, capsys):
    arguments = [f"--unseen_root={folders['unseen_shifted']}", f"--test_root={folders['test']}"]
    with pytest.raises(SystemExit) as exit_info:
        defend(quickstart_run, tmp_path / "refused", *arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lightning-backdoor: error: ") and "accept_low_accuracy" in error
    assert not (tmp_path / "refused").exists()
    report = defend(quickstart_run, tmp_path / "insisted", *arguments, "--accept_low_accuracy=true")
    assert report["defense"]["num_unseen"] == 20


def missing_class(folder: Path, tmp: Path) -> Path:
    """A copy of ``folder`` without class ``7``."""
    copy = tmp / "without_7"
    for path in folder.rglob("*.png"):
        if path.parent.name != "7":
            (copy / path.parent.name).mkdir(parents=True, exist_ok=True)
            (copy / path.parent.name / path.name).write_bytes(path.read_bytes())
    return copy


#: (id, arguments given {unseen}, {tmp}, {without_7}, {named}; the message after "lightning-backdoor: error: ")
REFUSALS = [
    ("unseen_class_without_images", ["--unseen_root={without_7}"],
     "--unseen_root {without_7} has no images of class '7'; the defense needs >= 1 clean image of every class "
     "(10 classes)"),
    ("folder_not_a_class", ["--unseen_root={named}"],
     "{named}/ has class folder 'eight' that is not one of the 10 classes ('0', '1', '2', '3', '4', '5', '6', '7', "
     "'8', '9')"),
    ("classes_of_another_length", ["--unseen_root={unseen}", "--classes=[a, b, c]"],
     "--classes lists 3 classes but the model has 10; list its class names in label order"),
    ("classes_reordered_against_the_datas_test_split", ["--unseen_root={unseen}",
                                                         "--classes=['1', '0', '2', '3', '4', '5', '6', '7', '8', '9']"],
     "--classes orders the classes unlike the data config (label 0: '1' in --classes, '0' in the data config; "
     "label 1: '0' in --classes, '1' in the data config), whose test split this run uses in the data config's "
     "order: give --test_root labelled in the order of --classes too, or drop --classes if the data config's order "
     "is the model's"),
    ("more_per_class_than_the_folder_holds", ["--unseen_root={unseen}", "--unseen_per_class=3"],
     "asked for 3 unseen images per class (--unseen_per_class, else the config's DefenseCallback) but {unseen}/0 "
     "holds 2: pass --unseen_per_class 2 or fewer, or add images"),
    ("test_folder_missing", ["--test_root={tmp}/nowhere"],
     "data folder {tmp}/nowhere does not exist; expected {tmp}/nowhere/<class>/<image files>"),
]


@pytest.mark.parametrize("arguments, message", [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS])
def test_a_mismatched_folder_is_refused_in_one_line(quickstart_run, folders, tmp_path, capsys, arguments, message):
    names = {"unseen": folders["unseen"], "named": folders["unseen_named"], "tmp": tmp_path,
             "without_7": missing_class(folders["unseen"], tmp_path)}
    with pytest.raises(SystemExit) as exit_info:
        defend(quickstart_run, tmp_path / "out", *[argument.format(**names) for argument in arguments])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert (captured.out + captured.err).strip().splitlines() == [f"lightning-backdoor: error: "
                                                                  f"{message.format(**names)}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("image_size, center_crop", [(32, 28), (None, 20)])
@pytest.mark.parametrize("streaming", [False, True])
def test_own_images_are_resized_and_cropped_as_the_data_config_says(tmp_path, image_size, center_crop, streaming):
    """A model trained on centre-cropped images (shorter side to ``image_size``, default the crop, then the centre)
    gets the defender's images prepared the same way, pixel for pixel the data module's own training images: not
    squashed square. Portrait, landscape and square files."""
    from test_streaming import make_folder

    from lightning_backdoor.cli import own_images

    root = make_folder(tmp_path, sizes=((37, 23), (23, 41), (30, 30)))
    settings = dict(source="imagefolder", root=str(root), image_size=image_size, center_crop=center_crop,
                    unseen_per_class=2)
    trained_on = PoisonedDataModule(**settings).train_pool
    own = own_images(str(root / "train"), trained_on.classes, PoisonedDataModule(**settings, streaming=streaming),
                     "unseen")
    assert own.images.shape[1:] == (3, center_crop, center_crop)
    assert torch.equal(own.images, trained_on.images) and torch.equal(own.labels, trained_on.labels)

