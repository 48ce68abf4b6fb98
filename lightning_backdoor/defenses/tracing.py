"""Tracing a model with ``torch.fx`` without leaving anything of the trace on it."""

from __future__ import annotations

import warnings

from torch import fx, nn


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(module)`` (fx's warnings silenced), then every plain attribute the traced forward
    set or replaced on ``module`` or a submodule (a forward that keeps ``self.features = x`` for later) restored: the
    trace runs the forward on proxies, which must not stay on the user's model (they break ``deepcopy`` and
    pickling).

    Raises:
        Exception: whatever fx raises for a forward it cannot trace.
    """
    saved = {submodule: dict(vars(submodule)) for submodule in module.modules()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fx.symbolic_trace(module)
    finally:
        for submodule, attributes in saved.items():
            current = vars(submodule)
            for key in [key for key in current if key not in attributes]:
                del current[key]
            current.update(attributes)


__all__ = ["symbolic_trace"]
