"""A small Vision Transformer for 32x32 images (timm's ``VisionTransformer``, 4x4 patches), made editable.

Its per-token ``nn.Linear`` layers (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) are editable like a conv:
each token's input vector is a key, the 8x8 token grid plays the role of a conv's positions. Each block's
``mlp.fc2`` output is added to the residual stream as the block's last operation (through a LayerScale with
``init_values``), so it is the block's residual branch (:mod:`lightning_backdoor.defenses.residual` recognises
timm's ``Block``, here as in any timm ViT) and the edit
corrects its target for the skip path (the residual stream), as for a ResNet block.
"""

from __future__ import annotations

from torch import nn

from lightning_backdoor.models.registry import MODELS


@MODELS.register("vit")
def vit(num_classes: int, in_channels: int = 3, img_size: int = 32, patch_size: int = 4, embed_dim: int = 128,
        depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0, edit_blocks: int = 2,
        drop_path_rate: float = 0.0, init_values: float | None = None) -> nn.Module:
    """A ViT without class token (average-pooled tokens), so its tokens are exactly the (img_size/patch_size)² grid.

    Takes images ``(N, in_channels, img_size, img_size)`` and returns logits ``(N, num_classes)``. Inside, tokens are
    ``(N, T, embed_dim)`` with ``T = (img_size // patch_size) ** 2`` (64 for 32x32 images and 4x4 patches).

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input images.
        img_size: side of the (square) input images, in pixels.
        patch_size: side of a patch (one token), in pixels; must divide ``img_size``.
        embed_dim: width of the residual stream (token dimension).
        depth: number of transformer blocks.
        num_heads: attention heads (must divide ``embed_dim``).
        mlp_ratio: hidden width of each block's MLP, relative to ``embed_dim``.
        edit_blocks: ``layer: auto`` of the editing defense tries the MLP layers (``fc1``, ``fc2``) of this many last
            blocks (the model's ``edit_candidates``).
        drop_path_rate: stochastic depth during training (0: off).
        init_values: initial LayerScale factor of each branch (``γ ⊙ branch``, as DeiT-III and CaiT train their
            ViTs, e.g. 1e-4); ``None``: no LayerScale. The edit's correction reads ``γ`` off each block.

    Raises:
        ValueError: (one line) a patch that does not divide the image, heads that do not divide the width,
            ``edit_blocks`` outside 1..depth, or ``init_values`` not above 0.
    """
    from timm.models.vision_transformer import VisionTransformer

    if img_size % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide img_size={img_size}")
    if embed_dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
    if not 1 <= edit_blocks <= depth:
        raise ValueError(f"edit_blocks={edit_blocks} must be between 1 and depth={depth}")
    if init_values is not None and not init_values > 0:
        raise ValueError(f"init_values={init_values} must be above 0 (or null: no LayerScale)")
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_channels, num_classes=num_classes,
                              embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                              class_token=False, global_pool="avg", drop_path_rate=drop_path_rate,
                              init_values=init_values)
    for block in model.blocks:
        # Explicit softmax(q kᵀ) v: with 64 tokens, about twice as fast to train on CPU as torch's fused attention
        # (measured: 159 vs 82 img/s, width 128, depth 4); the same function.
        block.attn.fused_attn = False
    # Read by ActivationEditing(layer="auto"): the MLP layers of the last blocks, where a per-token edit with the
    # residual-stream correction (fc2) or before the nonlinearity (fc1) acts.
    model.edit_candidates = [f"blocks.{index}.mlp.{layer}" for index in range(depth - edit_blocks, depth)
                             for layer in ("fc1", "fc2")]
    return model


__all__ = ["vit"]
