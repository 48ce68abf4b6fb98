import pytest
import torch

from lightning_backdoor.data import PoisonedDataModule, attack_labels, plan_splits
from lightning_backdoor.data.augment import random_crop
from lightning_backdoor.triggers import BadNets

LABELS = torch.arange(10).repeat_interleave(100)  # 1,000 samples, 100 per class


def plan(**overrides):
    settings = dict(num_classes=10, target_class=0, poison_rate=0.1, unseen_per_class=5, val_fraction=0.1,
                    clean_label=False, cross_ratio=0.0, seed=0) | overrides
    return plan_splits(LABELS, **settings)


def test_exact_poisoned_count_and_only_non_target_samples():
    splits = plan()
    assert len(splits.poisoned) == round(0.1 * len(splits.train))
    assert (LABELS[splits.poisoned] != 0).all()
    assert torch.isin(splits.poisoned, splits.train).all()


def test_unseen_split_is_disjoint_balanced_and_never_poisoned():
    splits = plan()
    assert len(splits.unseen) == 50
    assert torch.bincount(LABELS[splits.unseen], minlength=10).tolist() == [5] * 10
    assert not torch.isin(splits.unseen, splits.train).any()
    assert not torch.isin(splits.unseen, splits.val).any()
    assert not torch.isin(splits.unseen, splits.poisoned).any()
    assert not torch.isin(splits.val, splits.train).any()
    assert len(splits.unseen) + len(splits.val) + len(splits.train) == len(LABELS)
    # the first k * num_classes unseen images hold k images of every class, so budgets nest
    assert sorted(LABELS[splits.unseen[:10]].tolist()) == list(range(10))


def test_same_seed_same_indices_other_seed_other_indices():
    first, second, other = plan(seed=3), plan(seed=3), plan(seed=4)
    for name, indices in first.as_dict().items():
        assert torch.equal(indices, second.as_dict()[name])
    assert not torch.equal(first.poisoned, other.poisoned)
    assert not torch.equal(first.unseen, other.unseen)


def test_clean_label_poisons_target_class_only():
    splits = plan(clean_label=True, poison_rate=0.05)
    assert (LABELS[splits.poisoned] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_to_all_poisons_every_class_in_proportion(seed):
    # unequal classes (400, 800, ..., 4,000 images), so "in proportion" differs from "equally"
    labels = torch.arange(10).repeat_interleave(400 * torch.arange(1, 11))
    splits = plan_splits(labels, num_classes=10, target_class=None, poison_rate=0.3, unseen_per_class=5,
                         val_fraction=0.1, clean_label=False, cross_ratio=0.0, seed=seed, all_to_all=True)
    assert len(splits.poisoned) == round(0.3 * len(splits.train))
    poisoned = torch.bincount(labels[splits.poisoned], minlength=10).float()
    trained = torch.bincount(labels[splits.train], minlength=10).float()
    # a uniform draw of 30 % of the training split: a class with n training images gets a hypergeometric count
    # whose fraction has standard deviation sqrt(0.3 * 0.7 * 0.7 / n) <= 0.02 (n >= 355), so a margin of 0.1 is
    # >= 5 sd for every class and seed; an all-to-one draw gives class 0 (its default target) a fraction of 0
    assert (poisoned > 0).all()
    assert ((poisoned / trained - 0.3).abs() < 0.1).all(), (poisoned / trained).tolist()


def test_all_to_all_with_clean_label_is_refused():
    with pytest.raises(ValueError, match="all_to_all=true has no single target"):
        plan(clean_label=True, all_to_all=True, target_class=None)


def test_attack_labels_all_to_all_count_every_class():
    labels = torch.tensor([0, 1, 2, 9])
    assert attack_labels(labels, None, True, 10).tolist() == [1, 2, 3, 0]
    assert attack_labels(labels, 2, False, 10).tolist() == [2, 2, -1, 2]


def test_noise_mode_samples_are_clean_training_samples():
    splits = plan(cross_ratio=2.0)
    assert len(splits.noise) == 2 * len(splits.poisoned)
    assert not torch.isin(splits.noise, splits.poisoned).any()
    assert torch.isin(splits.noise, splits.train).all()


@pytest.mark.parametrize("overrides, message", [
    (dict(unseen_per_class=100), "too few for unseen_per_class=100"),
    (dict(clean_label=True, poison_rate=0.5), "poison_rate=0.5 needs"),
])
def test_impossible_plans_say_why(overrides, message):
    with pytest.raises(ValueError, match=message):
        plan(**overrides)


@pytest.fixture(scope="module")
def datamodule():
    module = PoisonedDataModule(source="mnist5k", trigger=BadNets(size=3), poison_rate=0.1, unseen_per_class=10)
    module.setup("fit")
    return module


def test_datamodule_training_set_carries_the_trigger_and_target_label(datamodule):
    images, labels = datamodule._datasets["train"].tensors
    train_index = {int(index): row for row, index in enumerate(datamodule.plan.train)}
    rows = torch.tensor([train_index[int(index)] for index in datamodule.plan.poisoned])
    assert (labels[rows] == 0).all()
    assert (images[rows][:, :, -3:, -3:] == 255).all()
    assert len(rows) == round(0.1 * len(datamodule.plan.train))


def test_datamodule_eval_batches_hold_triggered_images_and_attack_labels(datamodule):
    images, labels, triggered, attack = datamodule._datasets["test"].tensors
    assert (triggered[:, :, -3:, -3:] == 255).all()
    assert torch.equal(triggered[:, :, :-3], images[:, :, :-3])
    assert torch.equal(attack == -1, labels == 0)


def test_validation_dataset_is_the_held_out_training_pool_images_with_their_triggered_copies(datamodule):
    images, labels, triggered, attack = datamodule.validation_dataset().tensors
    assert torch.equal(labels, datamodule.train_pool.labels[datamodule.plan.val])
    assert torch.equal(images, datamodule.train_pool.images[datamodule.plan.val])  # clean: never poisoned
    assert (triggered[:, :, -3:, -3:] == 255).all() and torch.equal(attack == -1, labels == 0)


def test_all_to_all_datamodule_relabels_every_class_and_has_no_target_class():
    module = PoisonedDataModule(source="mnist5k", trigger=BadNets(size=3), poison_rate=0.1, unseen_per_class=10,
                                all_to_all=True)
    assert module.target_class is None  # no target-class accuracy anywhere, never class 0's
    module.setup("fit")
    images, labels = module._datasets["train"].tensors
    rows = torch.isin(module.plan.train, module.plan.poisoned)
    true_labels = module.train_pool.labels[module.plan.train]
    assert torch.equal(labels[rows], (true_labels[rows] + 1) % 10)
    assert torch.equal(labels[~rows], true_labels[~rows])
    assert set(true_labels[rows].tolist()) == set(range(10))  # class 0 is poisoned too
    test_labels, attack = module._datasets["test"].tensors[1], module._datasets["test"].tensors[3]
    assert torch.equal(attack, (test_labels + 1) % 10)  # every class's triggered test images count


@pytest.mark.parametrize("kwargs, message", [
    (dict(all_to_all=True, target_class=3), "target_class=3 has no meaning with all_to_all=true"),
    (dict(all_to_all=True, clean_label=True), "all_to_all=true has no single target"),
    (dict(poison_rate=1.5), "poison_rate=1.5 is outside"),
    (dict(poison_rate=-0.1), "poison_rate=-0.1 is outside"),
    (dict(target_class=10), "target_class=10 is not a class"),
    (dict(trigger=BadNets(size=40)), "larger than the 28x28 image"),
    (dict(unseen_per_class=600), "too few for unseen_per_class=600"),
    (dict(source="nope"), "unknown data source 'nope'"),
    (dict(source="imagefolder", root="/nonexistent"), "does not exist"),
])
def test_bad_datamodule_arguments_fail_with_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        PoisonedDataModule(**kwargs)
    assert "\n" not in str(info.value)


def test_empty_image_folder_is_reported(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        PoisonedDataModule(source="imagefolder", root=str(tmp_path))


def test_random_crop_shifts_content_without_changing_shape():
    images = torch.rand(16, 3, 8, 8)
    cropped = random_crop(images, 2)
    assert cropped.shape == images.shape
    # every output image is a shifted window of the reflect-padded input
    padded = torch.nn.functional.pad(images, (2,) * 4, mode="reflect")
    for image, window in zip(padded, cropped):
        assert any(torch.equal(image[:, dy:dy + 8, dx:dx + 8], window) for dy in range(5) for dx in range(5))
