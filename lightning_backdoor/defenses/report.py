"""Run a defense between two evaluations on the test split and write ``defense_report.json`` and the weights."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_backdoor.data.poisoning import attack_labels as make_attack_labels
from lightning_backdoor.defenses.base import Defense, UnseenData
from lightning_backdoor.evaluation import evaluate
from lightning_backdoor.io import atomic_json, atomic_save, atomic_write
from lightning_backdoor.metrics import AttackSuccessRate, defense_effectiveness_rating
from lightning_backdoor.provenance import environment
from lightning_backdoor.triggers import Trigger

REPORT_NAME = "defense_report.json"
#: A model whose accuracy is this likely (or likelier) under guessing is not told apart from chance.
CHANCE_P_VALUE = 0.01
#: ... nor is one that covers less than this fraction of the way from chance (1/K) to 100 %.
CHANCE_MARGIN = 0.1


@dataclass
class TestData:
    """Clean test images (N, C, H, W), labels, triggered images and attack labels (``-1``: not attacked)."""

    images: Tensor
    labels: Tensor
    triggered: Tensor | None
    attack_labels: Tensor | None

    @classmethod
    def from_clean(cls, images: Tensor, labels: Tensor, trigger: Trigger | None, target_class: int | None,
                   num_classes: int) -> TestData:
        """Build the triggered half with a known trigger (all-to-one to ``target_class``)."""
        if trigger is None or target_class is None:
            return cls(images, labels, None, None)
        floats = images.float() / 255 if images.dtype == torch.uint8 else images
        return cls(images, labels, trigger(floats), make_attack_labels(labels, target_class, False, num_classes))


def unique_path(path: Path) -> Path:
    """``path`` if free, else ``stem-v1.suffix``, ``stem-v2.suffix``...: outputs never overwrite a file."""
    candidate, version = path, 0
    while candidate.exists():
        version += 1
        candidate = path.with_name(f"{path.stem}-v{version}{path.suffix}")
    return candidate


def near_chance(correct: int, total: int, num_classes: int) -> bool:
    """Whether ``correct`` right answers out of ``total`` are indistinguishable from, or barely above, guessing among
    ``num_classes`` classes.

    Two rules, either suffices: (1) the one-sided exact binomial test against guessing, P(X >= correct) for
    X ~ Binomial(total, 1/K), is above ``CHANCE_P_VALUE`` (1 %): a guessing model passes it less than once in a
    hundred, while a model right on 90 % of 10 images fails it with probability below 0.2 %; on 50 images of
    10 classes it needs 11 right (22 %); (2) the accuracy covers less than ``CHANCE_MARGIN`` (a tenth) of the way
    from 1/K to 100 % (19 % for 10 classes, 55 % for 2): on thousands of test images the test alone would call 11 %
    "above chance".
    """
    if total <= 0 or num_classes < 2:
        return False
    chance = 1 / num_classes
    if correct / total < chance + CHANCE_MARGIN * (1 - chance):
        return True
    hits = torch.arange(correct, total + 1, dtype=torch.float64)
    tail = torch.distributions.Binomial(total, torch.tensor(chance, dtype=torch.float64)).log_prob(hits)
    return tail.logsumexp(0).exp().item() > CHANCE_P_VALUE


def chance_line(accuracy: float, total: int, num_classes: int, what: str) -> str:
    """``the model is right on 9 % of the 50 unseen images (chance 10 %)``-style text; ``accuracy`` a fraction."""
    return f"right on {100 * accuracy:.0f} % of the {total} {what} images (chance {100 / num_classes:.0f} %)"


@torch.no_grad()
def trigger_success_rate(model: nn.Module, trigger: Trigger, target_class: int, images: Tensor, labels: Tensor,
                         batch_size: int = 1000) -> float:
    """The fraction of ``images`` (N, C, H, W; uint8 or float in [0, 1]) not of ``target_class`` that ``model``
    assigns to ``target_class`` once ``trigger`` is applied (attached to the model for a feature-space trigger)."""
    metric = AttackSuccessRate(sync_on_compute=False)
    attack = torch.where(labels == target_class, torch.full_like(labels, -1), torch.full_like(labels, target_class))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with trigger.attached(model):
            for start in range(0, len(labels), batch_size):
                chunk = images[start:start + batch_size]
                pixels = (chunk.float() / 255 if chunk.dtype == torch.uint8 else chunk.float()).to(device)
                metric.update(model(trigger(pixels)).float().cpu(), attack[start:start + batch_size])
    finally:
        model.train(was_training)
    return metric.compute().item()


def defend_and_report(model: nn.Module, defense: Defense, unseen: UnseenData, trigger: Trigger | None,
                      target_class: int | None, test: TestData, num_classes: int,
                      trigger_known: bool = True, after_defense: Callable[[], None] | None = None) -> dict[str, Any]:
    """Evaluate, defend ``model`` in place, evaluate again; return the report (fractions in [0, 1]).

    With ``trigger_known=False`` the defense gets neither trigger nor target (it estimates them); ``trigger`` and
    ``target_class`` then only serve the evaluation. Without them (``test.triggered`` None) the true ASR cannot be
    measured (``true_asr_measured`` False): each stage then holds ``estimated_asr``, the success of the *estimated*
    trigger toward the estimated target (``estimated_target``) on the test images, when the defense estimated one.
    ``after_defense`` runs right after the defense, before the evaluation after it (e.g. rounding the weights to
    the dtype the model stores them in). ``warnings`` lists one line per doubt about the result (empty if none).
    """
    def scores(network: nn.Module) -> dict[str, Any]:
        return evaluate(network, test.images, test.labels, test.triggered, test.attack_labels, num_classes,
                        target_class)

    original = copy.deepcopy(model) if not trigger_known and test.triggered is None else None
    before = scores(model)
    start = time.perf_counter()
    info = defense.defend(model, unseen, *((trigger, target_class) if trigger_known else (None, None)))
    seconds = time.perf_counter() - start
    if after_defense is not None:
        after_defense()
    after = scores(model)
    edited = model
    edited_state = info.pop("edited_layer_state", None)
    estimate = info.pop("estimate", None)
    if info.get("repaired") and edited_state is not None:
        edited = copy.deepcopy(model)
        edited.get_submodule(info["layer"]).load_state_dict(edited_state)
    after_edit = scores(edited) if edited is not model else after
    report: dict[str, Any] = {"before": before, "after_edit": after_edit, "after": after}
    report["defense"] = {"method": info.pop("method", defense.name), "layer": info.pop("layer", None),
                         "num_unseen": len(unseen.labels), "seconds": seconds,
                         "repaired": bool(info.pop("repaired", False))} | info
    report["true_asr_measured"] = "asr" in before
    if "asr" in before:
        report["der"] = defense_effectiveness_rating(before["asr"], after["asr"], before["clean_acc"],
                                                     after["clean_acc"])
    elif original is not None and getattr(estimate, "target_class", None) is not None:
        report["estimated_target"] = estimate.target_class
        for stage, network in (("before", original), ("after_edit", edited), ("after", model)):
            report[stage]["estimated_asr"] = trigger_success_rate(network, estimate.trigger, estimate.target_class,
                                                                  test.images, test.labels)
    report["warnings"] = []
    total = len(test.labels)
    if near_chance(round(after["clean_acc"] * total), total, num_classes):
        accuracy = chance_line(after["clean_acc"], total, num_classes, "test")
        report["warnings"].append(f"after the defense the model is {accuracy}: near chance")
    report["environment"] = environment()  # bit-identical figures need the same stack and thread count
    return report


def save_image(image: Tensor, path: str | Path, scale: int = 8) -> None:
    """Save an image (C, H, W) in [0, 1] as PNG (atomically, creating its folder), enlarged ``scale`` times (nearest
    neighbour) to be visible."""
    from PIL import Image

    pixels = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0)
    array = pixels.squeeze(-1).numpy() if pixels.shape[-1] == 1 else pixels.numpy()
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def write_outputs(report: dict[str, Any], state_dict: dict[str, Tensor], output_dir: str | Path
                  ) -> tuple[Path, Path]:
    """Write the defended weights (a code-free Lightning-style checkpoint and safetensors), the report and its bar
    chart (``defense_report.png``), each atomically and under a fresh name; returns (report path, checkpoint path)."""
    import lightning
    from safetensors.torch import save_file

    from lightning_backdoor.defenses.report_plot import save_report_plot

    output_dir = Path(output_dir)
    checkpoint_path = unique_path(output_dir / "defended.ckpt")
    state = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    checkpoint = {"state_dict": state, "pytorch-lightning_version": lightning.__version__,
                  "epoch": 0, "global_step": 0}
    atomic_save(checkpoint, checkpoint_path)
    safetensors_path = checkpoint_path.with_suffix(".safetensors")
    atomic_write(safetensors_path, lambda tmp: save_file(state, tmp))
    report = report | {"checkpoint": str(checkpoint_path), "safetensors": str(safetensors_path)}
    defense = report.get("defense", {})
    if defense.get("estimated_trigger_image") is not None:  # the trigger unknown: show what was estimated
        trigger_path = unique_path(output_dir / "estimated_trigger.png")
        save_image(defense["estimated_trigger_image"], trigger_path)
        defense = {k: v for k, v in defense.items() if k != "estimated_trigger_image"}
        report = report | {"defense": defense | {"estimated_trigger": str(trigger_path)}}
    report_path = unique_path(output_dir / REPORT_NAME)
    plot_path = unique_path(report_path.with_suffix(".png"))
    atomic_write(plot_path, lambda tmp: save_report_plot(report, tmp))
    report_path = atomic_json(report | {"plot": str(plot_path)}, report_path)
    return report_path, checkpoint_path
