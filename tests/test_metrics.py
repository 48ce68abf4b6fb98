import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from lightning_backdoor.data.poisoning import attack_labels
from lightning_backdoor.metrics import (AttackSuccessRate, BackdoorMetrics, RobustAccuracy,
                                        defense_effectiveness_rating)


def test_asr_and_robust_accuracy_by_hand():
    # target 0; sample 0 is of the target class and must not count
    labels = torch.tensor([0, 1, 2, 3, 4])
    attack = torch.tensor([-1, 0, 0, 0, 0])
    triggered_preds = torch.tensor([0, 0, 0, 3, 1])
    asr, ra = AttackSuccessRate(), RobustAccuracy()
    asr.update(triggered_preds, attack)
    ra.update(triggered_preds, labels, attack)
    assert asr.compute().item() == pytest.approx(2 / 4)
    assert ra.compute().item() == pytest.approx(1 / 4)


def test_metrics_accumulate_over_batches_and_accept_logits():
    asr = AttackSuccessRate()
    asr.update(torch.tensor([[5.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 0]))
    asr.update(torch.tensor([0, 0, 1]), torch.tensor([0, -1, 0]))
    assert asr.compute().item() == pytest.approx(2 / 4)


def test_asr_is_torchmetrics_accuracy_and_equals_a_hand_count_with_ignored_samples():
    # all-to-one to class 2 over 3 classes: the class-2 images (attack label -1) are skipped
    labels = torch.tensor([0, 2, 1, 2, 0, 1, 1])
    attack = torch.tensor([2, -1, 2, -1, 2, 2, 2])
    triggered_preds = torch.tensor([2, 2, 0, 0, 2, 2, 1])
    # counted: samples 0, 2, 4, 5, 6; predicted 2 among them: 0, 4, 5 -> 3 of 5 (sample 1's hit does not count)
    asr = AttackSuccessRate(num_classes=3)
    assert isinstance(asr, MulticlassAccuracy)
    asr.update(triggered_preds[:3], attack[:3])
    asr.update(torch.eye(3)[triggered_preds[3:]], attack[3:])  # logits, in a second batch
    assert asr.compute().item() == pytest.approx(3 / 5)


def test_asr_and_robust_accuracy_stay_apart_when_their_first_batch_agrees():
    # after the first batch ASR and RA hold equal counts (1 of 2 each); torchmetrics' compute groups would then
    # merge them, and the second batch (an ASR hit, an RA miss) would be counted for both
    metrics = BackdoorMetrics(num_classes=3, target_class=0)
    eye = torch.eye(3)
    metrics.update(eye[[1, 2]], torch.tensor([1, 2]), eye[[0, 2]], torch.tensor([0, 0]))
    metrics.update(eye[[1]], torch.tensor([1]), eye[[0]], torch.tensor([0]))
    values = metrics.compute()
    assert values["asr"].item() == pytest.approx(2 / 3)
    assert values["robust_acc"].item() == pytest.approx(1 / 3)


def test_backdoor_metrics_collection_by_hand():
    metrics = BackdoorMetrics(num_classes=3, target_class=0)
    eye = torch.eye(3)
    labels = torch.tensor([0, 1, 2, 2])
    clean_preds = torch.tensor([0, 1, 0, 2])      # CA 3/4, floor: one of three non-target predicted 0
    triggered_preds = torch.tensor([0, 0, 0, 2])  # ASR 2/3, RA 1/3
    metrics.update(eye[clean_preds], labels, eye[triggered_preds], torch.tensor([-1, 0, 0, 0]))
    values = metrics.compute()
    assert values["clean_acc"].item() == pytest.approx(0.75)
    assert values["asr"].item() == pytest.approx(2 / 3)
    assert values["asr_floor"].item() == pytest.approx(1 / 3)
    assert values["robust_acc"].item() == pytest.approx(1 / 3)
    assert values["target_acc"].item() == pytest.approx(1.0)
    assert values["per_class_acc"].tolist() == pytest.approx([1.0, 1.0, 0.5])


def test_all_to_all_asr_counts_every_class_and_has_no_target_accuracy():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    attack = attack_labels(labels, None, True, 3)  # (y + 1) mod 3: [1, 1, 2, 2, 0, 0], none skipped
    triggered_preds = torch.tensor([1, 0, 2, 2, 0, 1])  # hits: class 0 one of two, class 1 two, class 2 one
    metrics = BackdoorMetrics(num_classes=3, target_class=None)
    eye = torch.eye(3)
    metrics.update(eye[labels], labels, eye[triggered_preds], attack)
    values = metrics.compute()
    # 4 of 6: class 0's triggered images count (leaving them out, as an all-to-one plan with target 0 did, gives 3/4)
    assert values["asr"].item() == pytest.approx(4 / 6)
    assert values["robust_acc"].item() == pytest.approx(1 / 6)  # only the second image kept its label
    assert values["asr_floor"].item() == pytest.approx(0.0)
    assert "target_acc" not in values


def test_der_subtracts_the_clean_accuracy_drop():
    # ASR 0.95 -> 0.05 and CA 0.90 -> 0.85: (0.90 - 0.05 + 1) / 2
    assert defense_effectiveness_rating(0.95, 0.05, 0.90, 0.85) == pytest.approx(0.925)
    # a CA gain and an ASR rise are both clipped to zero
    assert defense_effectiveness_rating(0.10, 0.20, 0.80, 0.85) == pytest.approx(0.5)
    assert defense_effectiveness_rating(1.0, 0.0, 0.9, 0.9) == pytest.approx(1.0)


def test_bf16_evaluation_agrees_with_float32_where_the_logits_are_well_apart():
    """``evaluate(bf16=True)`` runs the same metrics under bf16 autocast on channels-last images: with logits far
    apart (no near-ties for bf16's rounding to flip) every metric equals float32's."""
    from lightning_backdoor.evaluation import evaluate

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    model = torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 4))
    images = torch.rand(64, 3, 8, 8)
    with torch.no_grad():
        logits = model(images)
    labels = logits.argmax(1)
    labels[::4] = (labels[::4] + 1) % 4  # a quarter wrong: CA 0.75
    triggered = images.flip(-1)
    attack_labels = torch.zeros(64, dtype=torch.long)
    with torch.no_grad():  # keep only images whose two largest logits are far apart in both views
        gaps = [(model(x).topk(2).values[:, 0] - model(x).topk(2).values[:, 1]) for x in (images, triggered)]
    keep = (gaps[0] > 0.05) & (gaps[1] > 0.05)
    args = (images[keep], labels[keep], triggered[keep], attack_labels[keep], 4, 0)
    dtypes = []
    conv.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    exact = evaluate(model, *args)
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    fast = evaluate(model, *args, bf16=True)
    assert set(dtypes) == {torch.bfloat16}  # it did run in bf16
    assert keep.sum() > 20 and exact == fast
