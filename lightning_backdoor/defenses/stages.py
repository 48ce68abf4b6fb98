"""A defense's stages (before it, after the edit, after the repair) run as versions of one live model, so that the
test split is read once for all of them and, where the defense changed one layer only, the graph upstream of that
layer runs once per batch instead of once per stage (:class:`StageVersions`, a
:data:`~lightning_backdoor.evaluation.Forward`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_backdoor.defenses.adapt import logits_of
from lightning_backdoor.defenses.suffix import SuffixPasses

#: the name the batch's records are kept under (one batch at a time)
BATCH = "batch"


class StageVersions:
    """The logits of each version of ``model`` on a batch, the versions being full states of it
    (``model.state_dict()`` layouts) that differ only in some tensors: each call loads each version's differing
    tensors into the live model in turn (exact copies, no arithmetic) and ends in the last version's state.

    When every differing tensor belongs to ``layer`` (an edit) and the model traces (:class:`SuffixPasses`), the
    first version runs through the traced graph, which records the values the graph after ``layer`` reads, and
    the others run that part alone (on the compact CIFAR-10 net edited at ``blocks.2.conv2``: 0.02 s of a 0.32-s
    pass for 500 images); otherwise, or once the split graph does not reproduce the model's own logits, each version
    is a whole pass. Versions that do not differ at all run once. ``reason`` says why whole passes are used
    (``None`` while the shortcut is in use).

    Args:
        model: the network, in eval mode while called (the caller's evaluation sets it).
        versions: the states, in the order of the logits returned; each holds at least the keys that differ.
        layer: the one layer the versions may differ in, or ``None`` (whole passes, e.g. while a hook is attached
            to the model during the passes).
        bf16: the passes under bfloat16 autocast.

    Raises:
        ValueError: fewer than one version, or versions with different keys for the tensors that differ.
    """

    def __init__(self, model: nn.Module, versions: list[dict[str, Tensor]], layer: str | None,
                 bf16: bool = False) -> None:
        if not versions:
            raise ValueError("no version to run")
        live = model.state_dict(keep_vars=True)
        keys = [key for key in versions[0] if isinstance(live.get(key), Tensor)  # not a module's extra state
                and any(not torch.equal(versions[0][key], version[key]) for version in versions[1:])]
        self.model, self.count = model, len(versions)
        self.targets = {key: live[key] for key in keys}
        self.versions = [{key: version[key].detach().clone() for key in keys} for version in versions]
        self.reason: str | None = None
        self.passes: SuffixPasses | None = None  # traced at the first call, in the mode the caller set
        self.split = bool(keys) and layer is not None and all(key.startswith(f"{layer}.") for key in keys)
        if not keys:
            self.reason = "the versions do not differ"
        elif not self.split:
            self.reason = "no layer named" if layer is None else "the versions differ outside one layer"
        self.layer, self.bf16 = layer, bf16

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Tensor]:
        """Logits (B, K), float32, of each version on ``images`` (B, C, H, W) as the model takes them."""
        if not self.targets:
            with torch.autocast(images.device.type, torch.bfloat16, enabled=self.bf16):
                return [logits_of(self.model(images)).float()] * self.count
        if self.split and self.passes is None:
            self.passes = SuffixPasses(self.model, [self.layer], self.bf16)
            self.reason = self.passes.reason
        results = []
        for index, version in enumerate(self.versions):
            self._load(version)
            if self.passes is not None and self.passes.active and index == 0:
                logits = self.passes.record(BATCH, images)
                if self.passes.active:
                    results.append(logits)
                    continue
            if self.passes is not None and self.passes.ready(BATCH) and index > 0:
                results.append(self.passes.logits(self.layer, BATCH, images, torch.arange(len(images))))
                continue
            if self.passes is not None and not self.passes.active:
                self.reason = self.passes.reason
            with torch.autocast(images.device.type, torch.bfloat16, enabled=self.bf16):
                results.append(logits_of(self.model(images)).float())
        return results

    def _load(self, version: dict[str, Tensor]) -> None:
        for key, value in version.items():
            self.targets[key].data.copy_(value)
