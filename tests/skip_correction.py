"""One check shared by the residual-branch tests (torchvision blocks, the ViT): an exact edit of a block's branch
layer, with and without the skip-path correction, and how far the block's output on triggered inputs stays from
its clean output."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lightning_backdoor.defenses.activation_editing import EditProblem, add_delta
from lightning_backdoor.defenses.activations import LayerActivations, capture, get_layer


def block_output(model: nn.Module, block: str, images: Tensor) -> Tensor:
    """The output of submodule ``block`` when ``model`` runs on ``images``."""
    outputs = []
    handle = model.get_submodule(block).register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        model(images)
    handle.remove()
    return outputs[0]


def skip_correction_gaps(model: nn.Module, layer: str, block: str, clean_inputs: Tensor,
                         triggered_inputs: Tensor) -> tuple[Tensor, dict[bool, Tensor]]:
    """‖block(triggered) − block(clean)‖ before any edit, and after an almost unregularised edit of ``layer``
    (λ = 1e-4, the clean inputs as non-target images), with the skip correction (``True``) and blind to it."""
    clean, triggered = capture(model, [layer], clean_inputs)[layer], capture(model, [layer], triggered_inputs)[layer]
    clean_block = block_output(model, block, clean_inputs)
    before = (block_output(model, block, triggered_inputs) - clean_block).norm()
    labels = torch.ones(len(clean_inputs), dtype=torch.long)
    gaps = {}
    for corrected in (True, False):
        edited = copy.deepcopy(model)
        if corrected:
            problem = EditProblem.build(get_layer(edited, layer), clean, triggered, labels, 0, None)
        else:  # the same edit, blind to the skip path
            problem = EditProblem.build(get_layer(edited, layer), LayerActivations(clean.keys, clean.values, None),
                                        LayerActivations(triggered.keys, triggered.values, None), labels, 0, None)
        add_delta(edited, layer, problem.solve("closed_form", strength=1e-4, rank=0))
        gaps[corrected] = (block_output(edited, block, triggered_inputs) - clean_block).norm()
    return before, gaps
