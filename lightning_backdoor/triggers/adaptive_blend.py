"""Adaptive-Blend: a blend pattern cut into pieces, a random half of them on each poisoned training image and the
whole pattern at test time (Qi et al., ICLR 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_backdoor.triggers.base import TRIGGERS, Trigger
from lightning_backdoor.triggers.blended import Blended, check_file


@TRIGGERS.register("adaptive_blend")
class AdaptiveBlend(Trigger):
    """Blend a pattern cut into a ``pieces`` x ``pieces`` grid: ``train_pieces`` random pieces at opacity ``alpha``
    on each poisoned training image, the whole pattern at ``test_alpha`` at test time.

    From "Revisiting the Assumption of Latent Separability for Backdoor Defenses" (Qi et al., ICLR 2023). Training
    with partial, faint triggers and testing with the full, stronger one keeps the poisoned samples' features close to
    the clean ones', which defenses that separate the two in latent space rely on. The paper also trains
    *regularisation* samples: images carrying the (partial) trigger that keep their true labels. Here they are the
    trigger's noise mode: ``cross_ratio`` of them per poisoned image, drawn by the data module from the clean
    training images (they get :meth:`apply_noise`, the same random partial trigger, and keep their labels).

    :meth:`apply` (the test split, evaluation, defenses) is ``(1 - test_alpha) x + test_alpha p`` with the whole
    pattern ``p``; :meth:`apply_for_training` (the poisoned training images) is ``(1 - alpha m) x + alpha m p``
    with ``m`` (H, W) one on the chosen pieces, zero elsewhere, drawn per image from the data module's generator. The
    grid cuts the rows into ``pieces`` bands of ``H / pieces`` rows (rounded down at each edge), likewise the
    columns. Images ``(N, C, H, W)`` or ``(C, H, W)``, floats in [0, 1].

    Args:
        alpha: opacity of the chosen pieces on the poisoned training images, in (0, 1].
        test_alpha: opacity of the whole pattern at test time, in (0, 1].
        pieces: the grid's side: ``pieces`` x ``pieces`` pieces (4: 16 pieces, as in the paper).
        train_pieces: pieces applied to each poisoned training image, 1 to ``pieces**2`` (8 of 16: half).
        cross_ratio: regularisation samples (trigger on, true label kept) per poisoned sample; 1.0 gives as many as
            poisoned samples (the paper's equal poison and cover rates), 0 none.
        image: path to the pattern image (any format PIL reads), resized to the images; ``None`` draws a seeded
            uniform-noise pattern instead, the same one :class:`Blended` draws for that seed.
        seed: seed of the noise pattern. The pieces are drawn from the generator the data module passes.
    """

    def __init__(
        self,
        alpha: float = 0.2,
        test_alpha: float = 0.25,
        pieces: int = 4,
        train_pieces: int = 8,
        cross_ratio: float = 1.0,
        image: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        for label, value in (("alpha", alpha), ("test_alpha", test_alpha)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"adaptive_blend {label} must be in (0, 1]; got {value}")
        if pieces < 1:
            raise ValueError(f"adaptive_blend pieces (the grid's side) must be >= 1; got {pieces}")
        if not 1 <= train_pieces <= pieces**2:
            raise ValueError(f"adaptive_blend train_pieces must be in 1..{pieces**2} (pieces={pieces}: a "
                             f"{pieces}x{pieces} grid); got {train_pieces}")
        if cross_ratio < 0:
            raise ValueError(f"adaptive_blend cross_ratio must be >= 0; got {cross_ratio}")
        if image is not None:
            check_file(image, "adaptive_blend trigger image")
        self.alpha = alpha
        self.test_alpha = test_alpha
        self.pieces = pieces
        self.train_pieces = train_pieces
        self.cross_ratio = cross_ratio
        self.image = image
        self._patterns: dict[tuple, Tensor] = {}

    def check(self, image_shape: tuple[int, int, int]) -> None:
        _, height, width = image_shape
        if self.pieces > min(height, width):
            raise ValueError(f"adaptive_blend pieces={self.pieces} cuts the {height}x{width} image into empty "
                             f"pieces; use pieces <= {min(height, width)}")

    #: The whole pattern ``(C, H, W)`` in [0, 1], built once per shape, device and dtype: Blended's (a seed gives
    #: the same pattern as Blended's for that seed, or the user's image).
    pattern = Blended.pattern

    def piece_index(self, height: int, width: int) -> Tensor:
        """Which piece each pixel belongs to, ``(H, W)`` int64 in ``0 .. pieces**2 - 1`` (row-major over the grid)."""
        rows = torch.arange(height) * self.pieces // height
        cols = torch.arange(width) * self.pieces // width
        return rows[:, None] * self.pieces + cols[None, :]

    def piece_masks(self, count: int, height: int, width: int, generator: torch.Generator) -> Tensor:
        """``count`` random masks ``(count, 1, H, W)`` of zeros and ones, each one on ``train_pieces`` pieces.

        One row of ``pieces**2`` uniform draws per image from ``generator`` (CPU), its ``train_pieces`` smallest
        chosen: a batch draws what its images drawn one by one would, in order.
        """
        draws = torch.rand(count, self.pieces**2, generator=generator)
        chosen = torch.zeros(count, self.pieces**2, dtype=torch.bool)
        chosen.scatter_(1, draws.argsort(dim=1)[:, : self.train_pieces], True)
        return chosen[:, self.piece_index(height, width)][:, None].float()

    def apply(self, images: Tensor) -> Tensor:
        """Blend the whole pattern at ``test_alpha`` into ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``)."""
        self.check(tuple(images.shape[-3:]))
        pattern = self.pattern(tuple(images.shape[-3:]), images.device, images.dtype)
        return torch.lerp(images, pattern.expand_as(images), self.test_alpha).clamp(0.0, 1.0)

    def apply_for_training(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Blend ``train_pieces`` random pieces of the pattern at ``alpha`` into each of ``images``
        ``(N, C, H, W)`` (or one ``(C, H, W)``); ``generator`` (CPU) draws the pieces."""
        self.check(tuple(images.shape[-3:]))
        height, width = images.shape[-2:]
        count = images.shape[0] if images.dim() == 4 else 1
        masks = self.piece_masks(count, height, width, generator).to(device=images.device, dtype=images.dtype)
        weight = (masks * self.alpha).reshape(*images.shape[:-3], 1, height, width)
        pattern = self.pattern(tuple(images.shape[-3:]), images.device, images.dtype)
        return torch.lerp(images, pattern.expand_as(images), weight).clamp(0.0, 1.0)

    def apply_noise(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The regularisation samples' trigger (their labels are kept): the training-time partial trigger."""
        return self.apply_for_training(images, generator)
