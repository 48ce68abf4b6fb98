"""Held-out passes of an edited model that recompute only what the edited layer changes.

The edit's layer choice, strength choice and repair checks run the unseen images U through the model once per
trial edit, each time with one layer's weights changed. Everything upstream of that layer, and every value the rest
of the network reads from upstream (a residual block's skip input), is the same in every trial.
:class:`SuffixPasses` traces the model once with ``torch.fx``, records those values for U's images, and then runs
only the part of the graph downstream of the edited layer. The values are recorded by hooks during the pass that
captures the layers' keys anyway (:meth:`SuffixPasses.recording`) where each is the input or output of a module
called once; otherwise by one more pass through the traced graph (:meth:`SuffixPasses.record`).

Where the model cannot be traced, where a hook would be bypassed by the traced graph (a hook on a module the trace
goes through, a forward hook on the model itself), where a recorded value is not one tensor row per image, where
the records would not fit in memory, or where the split graph does not reproduce the model's own logits on the
first images, every pass is a whole pass instead (``reason`` says why), so no result depends on the shortcut beyond
float rounding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, fx, nn

from lightning_backdoor.defenses.adapt import logits_hook, logits_of
from lightning_backdoor.defenses.tracing import symbolic_trace

#: the most the recorded values may take, as a fraction of the memory available (and at most 2 GiB without a figure)
MEMORY_FRACTION = 0.25
DEFAULT_MEMORY = 2 << 30
#: how close the split graph's logits must be to the model's own on the first images (relative to their scale)
TOLERANCE = 1e-4


class SuffixPasses:
    """Logits of ``model`` with one of ``layers`` edited, recomputing only the graph downstream of that layer.

    Args:
        model: the network, in eval mode while used; its weights may change between calls (trial edits), its
            structure may not.
        layers: the names of the layers that may be edited (leaf modules: ``nn.Linear`` or ``nn.Conv2d``).
        bf16: run the passes under bfloat16 autocast (as the whole passes would).
        batch_size: images per pass.
        memory: bytes the records may take; ``None``: :data:`DEFAULT_MEMORY`.

    Record each image set under a name, during passes the caller makes anyway (``with passes.recording(name):``,
    then :meth:`finish`) or in a pass of its own (:meth:`record`); then :meth:`logits`. ``reason`` is ``None`` while
    the shortcut is in use and says why whole passes are used otherwise.
    """

    def __init__(self, model: nn.Module, layers: list[str], bf16: bool = False, batch_size: int = 500,
                 memory: int | None = None) -> None:
        self.model, self.bf16, self.batch_size = model, bf16, batch_size
        self.device_type = next(model.parameters()).device.type  # autocast's, where the model runs
        self.memory = DEFAULT_MEMORY if memory is None else memory
        self.records: dict[str, list[Any]] = {}  # image set -> the recorded values, in `self.recorded` order
        self.pending: dict[str, list[list[Any]]] = {}  # image set -> each value's recorded chunks, not yet checked
        self.suffixes: dict[str, tuple[fx.GraphModule, list[int]]] = {}  # layer -> its graph, its records' indices
        #: where hooks find each recorded value: (module name, "in" and the argument's position, or "out"); None
        #: where one cannot be found so (then :meth:`recording` records nothing and :meth:`finish` makes a pass)
        self.locators: list[tuple[str, str, int]] | None = None
        self._held = 0  # bytes recorded by hooks so far
        self.reason: str | None = None
        try:
            self._build(layers)
        except Exception as error:  # noqa: BLE001 - whatever keeps a model from tracing means whole passes
            self.reason = f"the model does not trace with torch.fx ({type(error).__name__}: {str(error)[:120]})"

    def _build(self, layers: list[str]) -> None:
        model = self.model
        # the defense's own logits_hook does what the passes do to the graph's output anyway (logits_of)
        if any(hook is not logits_hook for hook in model._forward_hooks.values()) \
                or getattr(model, "_forward_pre_hooks_with_kwargs", None) \
                or getattr(model, "_forward_hooks_with_kwargs", None):
            self.reason = "the model has a forward hook the traced graph would bypass"
            return
        traced = symbolic_trace(model)
        nodes = list(traced.graph.nodes)
        called = Counter(node.target for node in nodes if node.op == "call_module")
        for name, module in model.named_modules():
            if name and name not in called and (module._forward_hooks or module._forward_pre_hooks):
                self.reason = f"module {name!r} has a hook the traced graph would bypass"
                return
        output = next(node for node in nodes if node.op == "output")
        downstream: dict[str, set[fx.Node]] = {}
        for layer in layers:
            reached: set[fx.Node] = set()
            for node in nodes:  # topological order: a node is downstream when it is the layer or reads one
                if (node.op == "call_module" and node.target == layer) or any(
                        source in reached for source in node.all_input_nodes):
                    reached.add(node)
            if output not in reached:
                self.reason = f"layer {layer!r} is not called in the traced graph"
                return
            downstream[layer] = reached
        frontier = {layer: [node for node in nodes if node not in reached and node.op != "get_attr"
                            and any(user in reached for user in node.users)]
                    for layer, reached in downstream.items()}
        self.recorded = [node for node in nodes if any(node in kept for kept in frontier.values())]
        self.recorder = fx.GraphModule(traced, _graph_with_outputs(traced.graph, self.recorded))
        for layer, reached in downstream.items():
            graph, env = fx.Graph(), {}
            for index, node in enumerate(frontier[layer]):
                env[node] = graph.placeholder(f"recorded_{index}")
            for node in nodes:
                if node in reached and node is not output:
                    env[node] = graph.node_copy(node, lambda source: _value(graph, env, source))
            graph.output(fx.map_arg(output.args[0], lambda source: _value(graph, env, source)))
            self.suffixes[layer] = (fx.GraphModule(traced, graph),
                                    [self.recorded.index(node) for node in frontier[layer]])
        locators = [_locator(node, called, nodes) for node in self.recorded]
        self.locators = None if None in locators else locators

    @property
    def active(self) -> bool:
        return self.reason is None

    @contextmanager
    def recording(self, name: str) -> Iterator[None]:
        """While inside, each forward pass of the model also records, under ``name``, the values the suffixes read
        (hooks on the modules that take or return them); :meth:`finish` checks and keeps them. Records nothing
        where the values cannot all be found so."""
        if not self.active or self.locators is None:
            yield
            return
        pending = self.pending.setdefault(name, [[] for _ in self.recorded])
        modules = dict(self.model.named_modules())

        def keep(sink: list[Any], value: Any) -> None:
            if not self.active:
                return
            sink.append(value)
            self._held += value.numel() * value.element_size() if isinstance(value, Tensor) else 0
            if self._held > self.memory:  # checked as it grows: the captures run in chunks to keep memory flat
                self._stop(f"the recorded values would exceed {self.memory / 2**30:.2f} GiB")

        handles = []
        for sink, (module, kind, index) in zip(pending, self.locators):
            if kind == "in":  # a pre-hook on the model itself comes after its input transform: it sees what the
                # traced graph is given
                handles.append(modules[module].register_forward_pre_hook(
                    lambda _, args, sink=sink, index=index: keep(sink, args[index])))
            else:
                handles.append(modules[module].register_forward_hook(
                    lambda _, args, output, sink=sink: keep(sink, output)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def finish(self, name: str, images: Tensor, logits: Tensor | None = None) -> None:
        """Keep what :meth:`recording` recorded under ``name`` for ``images`` (N, C, H, W), or record them with
        :meth:`record` where it could not; checks the records as :meth:`record` does, against ``logits`` (N, K),
        the model's own on ``images`` from the recorded passes, when given."""
        if not self.active:
            return
        if self.locators is None:
            self.record(name, images)
            return
        self._keep(name, self.pending.pop(name, [[] for _ in self.recorded]), len(images))
        self._check(name, images, logits)

    @torch.no_grad()
    def record(self, name: str, images: Tensor) -> Tensor | None:
        """One whole pass of ``images`` (N, C, H, W) through the traced graph, keeping the values the suffixes read
        under ``name`` (e.g. ``"clean"``); then checks on the first images that the split graph reproduces the
        model's own logits, and that all records fit in memory (else whole passes from now on). Returns the
        graph's logits (N, K), float32 (``None`` when the shortcut was already stopped)."""
        if not self.active:
            return None
        chunks: list[list[Any]] = [[] for _ in self.recorded]
        logits = []
        with torch.autocast(self.device_type, torch.bfloat16, enabled=self.bf16):
            for chunk in images.split(self.batch_size):
                output, values = self.recorder(*self._root_inputs(chunk))
                logits.append(logits_of(output).float())
                for kept, value in zip(chunks, values):
                    kept.append(value)
        self._keep(name, chunks, len(images))
        self._check(name, images, None, torch.cat(logits))
        return torch.cat(logits)

    def _keep(self, name: str, chunks: list[list[Any]], count: int) -> None:
        """Each value's chunks joined (one row per image, ``count`` in all; a ``None`` or a flag kept as it is)."""
        values = []
        for parts in chunks:
            if parts and all(part is None or isinstance(part, bool) for part in parts):  # a mask left out, a flag
                if any(part is not parts[0] for part in parts):
                    self._stop("a flag the layers' suffixes read differs between images")
                    return
                values.append(parts[0])
            elif parts and all(isinstance(part, Tensor) and part.dim() > 0 for part in parts) \
                    and sum(len(part) for part in parts) == count:
                values.append(torch.cat(parts))
            else:
                self._stop("a value the layers' suffixes read is not one row per image")
                return
        self.records[name] = values
        if sum(value.numel() * value.element_size() for values in self.records.values() for value in values
               if isinstance(value, Tensor)) > self.memory:
            self._stop(f"the recorded values would exceed {self.memory / 2**30:.2f} GiB")

    def _check(self, name: str, images: Tensor, logits: Tensor | None, graph_logits: Tensor | None = None) -> None:
        """Whole passes from now on unless every suffix, unedited, gives the model's own logits on the first
        images (``logits``, or computed here), and so does the whole traced graph (``graph_logits``, when given)."""
        if not self.active:
            return
        first = torch.arange(min(4, len(images)))
        with torch.autocast(self.device_type, torch.bfloat16, enabled=self.bf16):
            reference = logits_of(self.model(images[first])).float() if logits is None else logits[first].float()
        scale = reference.abs().max().clamp(min=1.0)
        if graph_logits is not None and (graph_logits[first] - reference).abs().max() > TOLERANCE * scale:
            self._stop("the traced graph does not reproduce the model's logits")
            return
        for layer in self.suffixes:
            if (self._suffix(layer, name, first) - reference).abs().max() > TOLERANCE * scale:
                self._stop("the traced graph does not reproduce the model's logits")
                return

    def ready(self, name: str) -> bool:
        """Whether images recorded under ``name`` are served by the suffixes."""
        return self.active and name in self.records

    @torch.no_grad()
    def logits(self, layer: str, name: str, images: Tensor, rows: Tensor) -> Tensor:
        """Logits (n, K), float32, of ``images[rows]`` through the model as it is now (``layer`` edited): the suffix
        of ``layer`` over the values recorded under ``name`` for ``images``, or a whole pass when not recorded.
        ``rows``: a boolean mask or indices into ``images``."""
        if not self.ready(name):
            return self._whole(images[rows])
        return self._suffix(layer, name, rows)

    def _suffix(self, layer: str, name: str, rows: Tensor) -> Tensor:
        graph, indices = self.suffixes[layer]
        values = [value[rows] if isinstance(value := self.records[name][index], Tensor) else value
                  for index in indices]
        count = next(len(value) for value in values if isinstance(value, Tensor))
        with torch.autocast(self.device_type, torch.bfloat16, enabled=self.bf16):
            return torch.cat([logits_of(graph(*[value[start:start + self.batch_size] if isinstance(value, Tensor)
                                                else value for value in values])).float()
                              for start in range(0, count, self.batch_size)])

    def _whole(self, images: Tensor) -> Tensor:
        with torch.autocast(self.device_type, torch.bfloat16, enabled=self.bf16):
            return torch.cat([logits_of(self.model(chunk)).float() for chunk in images.split(self.batch_size)])

    def _root_inputs(self, images: Tensor) -> tuple[Any, ...]:
        """The model's forward pre-hooks applied, as ``model(images)`` applies them (an input transform)."""
        arguments: tuple[Any, ...] = (images,)
        for hook in self.model._forward_pre_hooks.values():
            result = hook(self.model, arguments)
            if result is not None:
                arguments = result if isinstance(result, tuple) else (result,)
        return arguments

    def _stop(self, reason: str) -> None:
        self.reason, self.records, self.pending, self._held = reason, {}, {}, 0


def _locator(node: fx.Node, called: Counter, nodes: list[fx.Node]) -> tuple[str, str, int] | None:
    """Where a hook finds ``node``'s value in an eager pass: the output of a module called once, an argument of
    one, or the model's input (a pre-hook on the model itself); None otherwise."""
    if node.op == "call_module" and called[node.target] == 1:
        return str(node.target), "out", 0
    if node.op == "placeholder":  # the images; a later argument keeps its default, which no hook sees
        placeholders = [source for source in nodes if source.op == "placeholder"]
        return ("", "in", 0) if node is placeholders[0] else None
    for user in node.users:
        if user.op == "call_module" and called[user.target] == 1 and node in user.args:
            return str(user.target), "in", user.args.index(node)
    return None


def _value(graph: fx.Graph, env: dict[fx.Node, fx.Node], source: fx.Node) -> fx.Node:
    """``source``'s node in ``graph``: mapped already, or (a parameter or buffer read) copied on first use."""
    if source not in env:
        env[source] = graph.node_copy(source, lambda inner: _value(graph, env, inner))
    return env[source]


def _graph_with_outputs(graph: fx.Graph, extra: list[fx.Node]) -> fx.Graph:
    """A copy of ``graph`` that returns ``(its output, (the values of extra...))``."""
    copied, env = fx.Graph(), {}
    for node in graph.nodes:
        if node.op == "output":
            result = fx.map_arg(node.args[0], env.__getitem__)
            copied.output((result, tuple(env[source] for source in extra)))
        else:
            env[node] = copied.node_copy(node, env.__getitem__)
    return copied


__all__ = ["SuffixPasses"]
