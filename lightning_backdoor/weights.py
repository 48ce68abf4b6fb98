"""Load a weights file saved in any common layout into a model: the mapping is found, checked exactly, and said.

Networks trained elsewhere are saved as ``torch.save(model.state_dict())`` of whatever held them: a bare network
(``conv1.weight``), ``nn.DataParallel``/DDP (``module.conv1.weight``), ``torch.compile`` (``_orig_mod.``), a
wrapper with a ``model``/``net`` attribute (``model.``, ``net.``; a Lightning checkpoint of
:class:`~lightning_backdoor.classifier.PoisonedClassifier` is ``net.``), or several of these in turn
(``module._orig_mod.``), or one attribute of another name holding the whole network (``backbone.``).
:func:`map_weights` tries stripping each chain of these prefixes shared by every key, then the one name every key
still begins with, and accepts only a mapping that matches the network exactly: same keys, same shapes. Nested files
(``{"state_dict": ...}``, ``{"model": ...}``) are unpacked by :func:`lightning_backdoor.io.load_state_dict`.

One tolerance, said in the printed line: BatchNorm ``num_batches_tracked`` counters absent from the file keep the
model's value. They are step counters, not weights: only ``momentum=None`` BatchNorm reads them, and some exporters
(old PyTorch, conversions) drop them. Any other missing, extra or reshaped key is refused.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import Tensor, nn

#: Prefixes wrappers add to every key: DataParallel/DDP, torch.compile, wrappers holding the network as an attribute.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
#: PoisonedClassifier's metric states (not weights), ignored when present.
IGNORED_PREFIXES = ("val_metrics.", "test_metrics.")
#: Keys that may be absent from a file (BatchNorm step counters); the model keeps its own value.
TOLERATED_ABSENT = "num_batches_tracked"


@dataclass(frozen=True)
class WeightsMapping:
    """How a file's keys were mapped onto a network.

    Attributes:
        stripped: the prefix removed from every key, e.g. ``"module._orig_mod."``; ``""`` when loaded as named.
        loaded: number of tensors loaded.
        target: what they were loaded into (``"net"`` for a PoisonedClassifier's network, else the class name).
        absent_counters: BatchNorm ``num_batches_tracked`` counters missing from the file, left unchanged.
        converted: ``(file dtype, model dtype)`` pairs of floating-point tensors cast on loading (e.g. float16
            weights into a float32 model: the defended weights are written in the model's dtype).
    """

    stripped: str
    loaded: int
    target: str
    absent_counters: int = 0
    converted: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """One line, e.g. ``weights: stripped 'module.' from 62 keys and loaded them into net``."""
        if self.stripped == "net." and self.target == "net":  # the layout this project writes: nothing was fixed up
            line = f"weights: loaded {self.loaded} keys into net (keys net.*, as lightning-backdoor saves them)"
        elif self.stripped:
            line = f"weights: stripped {self.stripped!r} from {self.loaded} keys and loaded them into {self.target}"
        else:
            line = f"weights: loaded {self.loaded} keys into {self.target} as named"
        if self.absent_counters:
            line += (f"; {self.absent_counters} BatchNorm num_batches_tracked counters are absent from the file and "
                     f"were left unchanged")
        if self.converted:
            line += "; cast " + ", ".join(f"{source} to {target}" for source, target in self.converted)
        return line


def map_weights(expected: dict[str, Tensor], state_dict: dict[str, Tensor]) -> tuple[str, dict[str, Tensor]]:
    """The prefix to strip from ``state_dict``'s keys and the renamed tensors that match ``expected`` (a network's
    ``state_dict()``) exactly, apart from absent ``num_batches_tracked`` counters.

    Raises:
        ValueError: (one line) no mapping matches; names the first mismatching key as the file names it
            (missing keys first, then extra ones, then shape differences; each alphabetically).
    """
    relevant = {key: value for key, value in state_dict.items() if not key.startswith(IGNORED_PREFIXES)}
    if not relevant:
        raise ValueError("checkpoint holds no weights (an empty state_dict)")
    candidates = [""]
    while prefix := next((p for p in WRAPPER_PREFIXES
                          if all(key.startswith(candidates[-1] + p) for key in relevant)), None):
        candidates.append(candidates[-1] + prefix)
    shared = {_first_name(key[len(candidates[-1]):]) for key in relevant}
    if len(shared) == 1 and None not in shared:  # one attribute of any name holds every weight ('backbone.')
        candidates.append(candidates[-1] + shared.pop() + ".")
    best: tuple[int, str, str] | None = None  # (keys in common, strip, first mismatch)
    for strip in candidates:
        mapped = {key[len(strip):]: value for key, value in relevant.items()}
        missing = sorted(key for key in set(expected) - set(mapped) if not _tolerated(key))
        extra = sorted(set(mapped) - set(expected))
        shapes = sorted(key for key in set(expected) & set(mapped) if expected[key].shape != mapped[key].shape)
        if not (missing or extra or shapes):
            return strip, mapped
        key = (missing or extra or shapes)[0]
        why = ("missing from the checkpoint" if missing else "not in the model" if extra else
               f"shape {tuple(mapped[key].shape)} in the checkpoint vs {tuple(expected[key].shape)} in the model")
        common = len(set(expected) & set(mapped))
        if best is None or common > best[0]:
            hint = ""
            if re.search(r"\bls[12]\.gamma$", key):  # a timm ViT's LayerScale on one side only
                hint = ("; the weights have LayerScale: add init_values (e.g. 1.0e-4) to model_kwargs" if extra else
                        "; the weights have no LayerScale: drop init_values from model_kwargs")
            best = (common, strip, f"first mismatching key {strip + key!r} ({why}){hint}")
    assert best is not None
    mixed = next(((prefix, count) for prefix in ("module.", "_orig_mod.")  # wrappers' names only, never a layer's
                  if 0 < (count := sum(key.startswith(prefix) for key in relevant)) < len(relevant)), None)
    hint = (f"; {mixed[1]} of its {len(relevant)} keys start with {mixed[0]!r} and the others do not (weights saved "
            f"from a wrapped and an unwrapped model mixed?)" if mixed else
            f"; the checkpoint's {len(relevant)} keys begin with {_first_names(relevant, candidates[-1])}, the model's "
            f"{len(expected)} with {_first_names(expected)}")
    raise ValueError(f"checkpoint does not match the model spec: {best[2]}{hint}")


def _first_name(key: str) -> str | None:
    """The first component of a dotted key (``backbone`` of ``backbone.0.weight``); ``None`` for a bare name."""
    head, dot, _ = key.partition(".")
    return head if dot else None


def _first_names(keys: dict[str, Tensor], strip: str = "", shown: int = 3) -> str:
    """``'backbone.' (28), 'head.' (2)``: the first components of ``keys`` once ``strip`` is removed (said after
    them), most frequent first, at most ``shown``."""
    counts = Counter(_first_name(key[len(strip):]) or key[len(strip):] for key in keys)
    names = ", ".join(f"{name + '.'!r} ({count})" for name, count in counts.most_common(shown))
    return (names + (f" and {len(counts) - shown} more" if len(counts) > shown else "")
            + (f" after {strip!r}" if strip else ""))


def _tolerated(key: str) -> bool:
    return key.rpartition(".")[2] == TOLERATED_ABSENT


def load_weights(module: nn.Module, state_dict: dict[str, Tensor]) -> WeightsMapping:
    """Load ``state_dict`` (any layout above) into a PoisonedClassifier's network, or into ``module`` itself if it
    has no ``net``; print the mapping in one line and return it.

    Raises:
        ValueError: (one line) the keys or shapes do not match under any mapping (see :func:`map_weights`).
    """
    has_net = isinstance(getattr(module, "net", None), nn.Module)
    target = module.net if has_net else module
    expected = target.state_dict()
    strip, mapped = map_weights(expected, state_dict)
    target.load_state_dict(mapped, strict=False)  # map_weights checked every key but absent counters
    converted = sorted({(str(value.dtype).removeprefix("torch."), str(expected[key].dtype).removeprefix("torch."))
                        for key, value in mapped.items()
                        if value.is_floating_point() and value.dtype != expected[key].dtype})
    mapping = WeightsMapping(strip, len(mapped), "net" if has_net else type(module).__name__,
                             sum(1 for key in expected if key not in mapped), tuple(converted))
    print(mapping.describe())
    return mapping


__all__ = ["WeightsMapping", "load_weights", "map_weights"]
