"""Bad image-folder input (the streaming path's and ``center_crop``'s refusals, and the folder refusals both paths
share; the rows of docs/bad-input.md named here) ends with one line on stderr naming the problem, exit code 2, and
no file created or changed: the same checks as test_bad_input.py, on small folders of their own (no fitted run
needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_bad_input import ROOT, check_one_line, command, snapshot

from lightning_backdoor.cli import main

DATA = "--data.init_args"
FOLDER = [f"{DATA}.source=imagefolder", f"{DATA}.root={{images}}"]
STREAMED = [*FOLDER, f"{DATA}.streaming=true"]

#: (id, arguments after ``fit --config configs/quickstart.yaml``, expected message). ``{images}``: a good folder,
#: ``{not_image}``: one holding a text file named ``.png``, ``{mixed}``: one with a 28x30 image among 28x28 ones, the
#: others as :func:`folders` spoils them; ``{tmp}``: the test's folder.
CASES = [
    ("streaming_other_source", [f"{DATA}.streaming=true"],
     "streaming=true reads image folders only (source=imagefolder with root=<folder>), not source 'mnist5k'"),
    ("streaming_without_root", [f"{DATA}.source=imagefolder", f"{DATA}.streaming=true"],
     "streaming=true needs root=<folder with train/<class>/*.jpg and test/<class>/*.jpg>"),
    ("streaming_with_cache_dir", [*STREAMED, f"{DATA}.cache_dir={{tmp}}/cache"],
     "streaming=true decodes images per batch; cache_dir keeps every decoded image on disk and in memory"),
    ("streaming_prepared_trigger", [*STREAMED, f"{DATA}.trigger=lightning_backdoor.triggers.LowFrequency"],
     "the low_frequency trigger is made with a model trained on the decoded training images; a streamed source "
     "does not decode them: use streaming=false"),
    ("folder_file_not_an_image", [f"{DATA}.source=imagefolder", f"{DATA}.root={{not_image}}"],
     "not_image/train/cat/007.png: not an image file Pillow can read"),
    ("streamed_file_not_an_image", [f"{DATA}.source=imagefolder", f"{DATA}.root={{not_image}}",
                                    f"{DATA}.streaming=true"],
     "not_image/train/cat/007.png: not an image file Pillow can read"),
    ("folder_images_differ_in_size", [f"{DATA}.source=imagefolder", f"{DATA}.root={{mixed}}"],
     "mixed/test/ant/001.png is 28x30 (height x width); set image_size=<pixels>"),
    ("streamed_images_differ_in_size", [f"{DATA}.source=imagefolder", f"{DATA}.root={{mixed}}",
                                        f"{DATA}.streaming=true"],
     "mixed/test/ant/001.png is 28x30 (height x width); set image_size=<pixels>"),
    ("center_crop_larger_than_image_size", [*FOLDER, f"{DATA}.image_size=24", f"{DATA}.center_crop=30"],
     "center_crop=30 is larger than image_size=24, the shorter side it is cut from; use image_size >= center_crop"),
    ("center_crop_zero", [*FOLDER, f"{DATA}.center_crop=0"], "center_crop=0 must be >= 1 pixel"),
    ("center_crop_not_an_image_folder", [f"{DATA}.center_crop=24"],
     "classes=, channels= and center_crop= apply to image folders only, not to source 'mnist5k'"),
    ("image_size_zero", [*FOLDER, f"{DATA}.image_size=0"], "image_size=0 must be >= 1 pixel"),
    ("folder_without_class_folders", [f"{DATA}.source=imagefolder", f"{DATA}.root={{loose}}"],
     "loose/train holds image files but no class folders; expected "),
    ("folder_class_without_images", [f"{DATA}.source=imagefolder", f"{DATA}.root={{hollow}}"],
     "hollow/train/cat holds no images; add images or remove the folder (image suffixes: .jpg"),
    ("test_split_has_another_class", [f"{DATA}.source=imagefolder", f"{DATA}.root={{extra}}"],
     "extra/test/ has class 'dog' that "),
    ("folder_float_pixels", [f"{DATA}.source=imagefolder", f"{DATA}.root={{float}}"],
     "float/train/cat/004.tif: floating-point pixels (PIL mode F) are not supported; save it with 8 bits per channel"),
    ("folder_pixels_out_of_range", [f"{DATA}.source=imagefolder", f"{DATA}.root={{out_of_range}}"],
     "out_of_range/train/cat/004.tif: mode I pixels outside 0..65535"),
    ("streamed_data_folder_missing", [f"{DATA}.source=imagefolder", f"{DATA}.root={{tmp}}/nowhere",
                                      f"{DATA}.streaming=true"],
     "nowhere/train does not exist; expected "),
    ("streamed_test_split_lacks_a_class", [f"{DATA}.source=imagefolder", f"{DATA}.root={{lacking}}",
                                           f"{DATA}.streaming=true"],
     "lacking/test/ lacks class 'cat' that "),
]
#: the cases refused alike without and with ``streaming=true`` (run both ways; one row each in the docs)
EITHER_WAY = ("center_crop_larger_than_image_size", "center_crop_zero", "image_size_zero",
              "folder_without_class_folders", "folder_class_without_images", "test_split_has_another_class",
              "folder_float_pixels")
RUNS = [(name, arguments, message) for name, arguments, message in CASES] + [
    (f"{name}-streamed", [*arguments, f"{DATA}.streaming=true"], message)
    for name, arguments, message in CASES if name in EITHER_WAY]


#: the fixture's folders: each a good folder, then spoiled as its comment says
FOLDERS = ("images", "not_image", "mixed", "loose", "hollow", "extra", "lacking", "float", "out_of_range")


@pytest.fixture()
def folders(tmp_path: Path) -> dict[str, str]:
    """Each of :data:`FOLDERS`: train/ and test/ of classes ant, bee, cat, 28x28 colour PNGs, then spoiled."""
    rng = np.random.default_rng(0)
    for name in FOLDERS:
        for split, count in (("train", 12), ("test", 3)):
            for label in ("ant", "bee", "cat"):
                folder = tmp_path / name / split / label
                folder.mkdir(parents=True)
                for index in range(count):
                    pixels = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    (tmp_path / "not_image" / "train" / "cat" / "007.png").write_text("not a picture")
    Image.new("RGB", (30, 28)).save(tmp_path / "mixed" / "test" / "ant" / "001.png")  # width 30, height 28
    loose = tmp_path / "loose" / "train"  # the images straight in train/, no class folders
    for path in list(loose.glob("*/*.png")):
        path.rename(loose / f"{path.parent.name}-{path.name}")
    for label in ("ant", "bee", "cat"):
        (loose / label).rmdir()
    for path in (tmp_path / "hollow" / "train" / "cat").iterdir():  # a class folder without images
        path.unlink()
    (tmp_path / "extra" / "test" / "dog").mkdir()  # a test class the training split lacks
    Image.new("RGB", (28, 28)).save(tmp_path / "extra" / "test" / "dog" / "000.png")
    shutil.rmtree(tmp_path / "lacking" / "test" / "cat")  # a training class the test split lacks
    Image.fromarray(np.zeros((28, 28), np.float32)).save(tmp_path / "float" / "train" / "cat" / "004.tif")  # mode F
    Image.fromarray(np.full((28, 28), 70000, np.int32)).save(tmp_path / "out_of_range" / "train" / "cat" / "004.tif")
    return {"tmp": str(tmp_path), **{name: str(tmp_path / name) for name in FOLDERS}}


@pytest.mark.parametrize("arguments, message", [run[1:] for run in RUNS], ids=[run[0] for run in RUNS])
def test_bad_folder_input(folders, tmp_path, capsys, arguments, message):
    run = tmp_path / "run"
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(command("fit", [argument.format(**folders) for argument in arguments], run))
    assert exit_info.value.code == 2
    check_one_line(capsys.readouterr().err, message)
    assert not run.exists()
    assert snapshot(tmp_path) == before


def test_the_docs_table_lists_every_case():
    table = (ROOT / "docs" / "bad-input.md").read_text()
    missing = [case[0] for case in CASES if f"`{case[0]}`" not in table]
    assert not missing, f"docs/bad-input.md's bad-input table lacks {missing}"
