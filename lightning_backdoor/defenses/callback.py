"""DefenseCallback: runs a defense at the end of fit (or when called) inside any Lightning Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_backdoor.dashboard import log_defense
from lightning_backdoor.defenses.activation_editing import ActivationEditing
from lightning_backdoor.defenses.base import Defense, UnseenData
from lightning_backdoor.defenses.report import TestData, defend_and_report, write_outputs
from lightning_backdoor.io import state_digest
from lightning_backdoor.triggers import Trigger


def _collect(loader: DataLoader) -> tuple[Tensor, Tensor]:
    """Images and labels of a loader yielding ``(images, labels, ...)`` batches."""
    images, labels = zip(*((batch[0], batch[1]) for batch in loader))
    return torch.cat(images), torch.cat(labels)


def check_ranks_agree(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """Compare the weights' SHA-256 across ranks (an all-gather of 32 bytes); raise if any rank differs, print the
    digest once, and return it. It equals ``state_digest`` of the saved ``defended.safetensors``."""
    digest = state_digest(pl_module.state_dict())
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int32, device=pl_module.device)
    gathered = trainer.strategy.all_gather(mine).reshape(-1, mine.numel())
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError("defense: the ranks hold different weights after the broadcast of the defended model")
    rank_zero_info(f"defense: {len(gathered)} process(es) hold the defended weights, sha256 {digest}")
    return digest


class DefenseCallback(L.Callback):
    """Remove a backdoor when training ends: defend, evaluate before/after on the test split, log, and save.

    Trigger, target class and unseen data come from a ``PoisonedDataModule`` when the trainer has one; pass them
    here to defend a model trained any other way.

    Args:
        defense: the defense to run (default: activation-guided editing with repair).
        trigger: the backdoor trigger (default: the data module's).
        target_class: the attack's target class (default: the data module's).
        unseen_per_class: use the first k unseen images per class (default: all the data module holds).
        unseen_dataloader: clean data the model never saw, yielding ``(images, labels)`` in [0, 1].
        test_dataloader: clean test data for the before/after evaluation (default: the data module's test split).
        output_dir: where ``defense_report.json`` and the defended weights go (default: the trainer's root dir).
        on_fit_end: run automatically at the end of ``fit``.
        trigger_known: ``False`` defends without backdoor knowledge: the defense estimates trigger and target
            itself; the known ones (if any) only serve the before/after evaluation.
    """

    def __init__(self, defense: Defense | None = None, trigger: Trigger | None = None,
                 target_class: int | None = None, unseen_per_class: int | None = None,
                 unseen_dataloader: DataLoader | None = None, test_dataloader: DataLoader | None = None,
                 output_dir: str | None = None, on_fit_end: bool = True, trigger_known: bool = True) -> None:
        self.defense = defense if defense is not None else ActivationEditing()
        self.trigger, self.target_class, self.unseen_per_class = trigger, target_class, unseen_per_class
        self.unseen_dataloader, self.test_dataloader = unseen_dataloader, test_dataloader
        self.output_dir, self.run_on_fit_end, self.trigger_known = output_dir, on_fit_end, trigger_known
        self.report: dict[str, Any] | None = None
        self.report_path: Path | None = None
        self.checkpoint_path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_on_fit_end:
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Defend ``pl_module`` in place on rank 0, broadcast the weights to every rank, log and save."""
        report = None
        if trainer.is_global_zero:
            report = self.defend(pl_module, getattr(trainer, "datamodule", None), trainer.loggers,
                                 Path(self.output_dir or trainer.default_root_dir))
        report = trainer.strategy.broadcast(report, src=0)
        state = trainer.strategy.broadcast({k: v.cpu() for k, v in pl_module.state_dict().items()}, src=0)
        pl_module.load_state_dict(state)
        check_ranks_agree(trainer, pl_module)
        self.report = report
        return report

    def defend(self, pl_module: nn.Module, datamodule: Any, loggers: list[Any], output_dir: Path) -> dict[str, Any]:
        """Defend ``pl_module`` in place (no Trainer needed), log to ``loggers``, write the report and weights."""
        trigger = self.trigger if self.trigger is not None else getattr(datamodule, "trigger", None)
        target = self.target_class if self.target_class is not None else getattr(datamodule, "target_class", None)
        unseen = self._unseen(datamodule)
        test, num_classes = self._test(datamodule, trigger, target, unseen)
        model = pl_module.net if isinstance(getattr(pl_module, "net", None), nn.Module) else pl_module
        device = next(pl_module.parameters()).device
        unseen = UnseenData(unseen.images.to(device), unseen.labels.to(device))
        rank_zero_info(f"defense: {self.defense.name or type(self.defense).__name__} on {len(unseen.labels)} unseen "
                       f"images, evaluated on {len(test.labels)} test images before and after...")
        report = defend_and_report(model, self.defense, unseen, trigger, target, test, num_classes,
                                   self.trigger_known)
        for logger in loggers:
            logger.log_metrics({f"defense/{stage}/{name}": value for stage in ("before", "after_edit", "after")
                                for name, value in report[stage].items() if isinstance(value, float)})
            if "der" in report:
                logger.log_metrics({"defense/der": report["der"], "defense/seconds": report["defense"]["seconds"]})
        self.report_path, self.checkpoint_path = write_outputs(report, pl_module.state_dict(), output_dir)
        log_defense(loggers, self.report_path, list(getattr(datamodule, "classes", [])) or None)
        before, after = report["before"], report["after"]
        rank_zero_info(f"defense: ASR {before.get('asr', float('nan')):.4f} -> {after.get('asr', float('nan')):.4f}, "
                       f"CA {before['clean_acc']:.4f} -> {after['clean_acc']:.4f} in "
                       f"{report['defense']['seconds']:.2f} s; report: {self.report_path}")
        return report

    def _unseen(self, datamodule: Any) -> UnseenData:
        if self.unseen_dataloader is not None:
            images, labels = _collect(self.unseen_dataloader)
            return UnseenData(images.float(), labels)
        if datamodule is None or not hasattr(datamodule, "unseen_set"):
            raise ValueError("DefenseCallback needs unseen clean data: use a PoisonedDataModule or pass "
                             "unseen_dataloader=")
        unseen = datamodule.unseen_set(self.unseen_per_class)
        return UnseenData(unseen.images.float() / 255, unseen.labels)

    def _test(self, datamodule: Any, trigger: Trigger | None, target: int | None,
              unseen: UnseenData) -> tuple[TestData, int]:
        if self.test_dataloader is None and hasattr(datamodule, "test_dataset"):
            return TestData(*datamodule.test_dataset().tensors), datamodule.num_classes
        loader = self.test_dataloader if self.test_dataloader is not None else datamodule.test_dataloader()
        images, labels = _collect(loader)
        num_classes = getattr(datamodule, "num_classes", None) or int(
            torch.cat([labels, unseen.labels.cpu()]).max()) + 1
        return TestData.from_clean(images, labels, trigger, target, num_classes), num_classes
