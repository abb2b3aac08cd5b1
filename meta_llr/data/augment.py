"""Batched on-device augmentation (random translation with zeros or reflections shifted in,
horizontal flip, random or alternating by epoch) and its config section ``data.augment``.

One pass per batch on the batch's own device: no Python loop over samples and no host-device
synchronisation; deterministic given the generator state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from meta_llr.options import opt

__all__ = ["AugmentConfig", "augment"]


@dataclass
class AugmentConfig:
    """``data.augment``: what :func:`augment` does to each training batch."""

    section: ClassVar[str] = "data.augment"
    crop_pad: int = opt(4, ge=0, doc="random crop: shift each image by up to this many pixels, zeros shifted in; 0: no crop")
    flip: bool = opt(True, free=True, doc="mirror each image left-right with probability 0.5")
    alternate_flip: bool = opt(False, free=True, doc="with flip: airbench's derandomised flip, each image mirrored "
                                                     "by a coin drawn once per run, and the other way every odd epoch")
    pad_mode: str = opt("zeros", choices=("zeros", "reflect"), doc="what the crop shifts in: zeros, or the image "
                                                                  "reflected at its border (airbench)")


def augment(x: torch.Tensor, crop_pad: int, flip: bool, generator: torch.Generator | None, *,
            reflect: bool = False, mirror: torch.Tensor | None = None) -> torch.Tensor:
    """Random crop with zero (or reflect) padding and horizontal flip, batched.

    ``x`` is ``[B, C, H, W]`` (uint8 or float) on any device; ``generator`` must
    live on the same device (``None`` uses torch's default generator there).
    Each sample is translated by its own integer offset in ``[-crop_pad, crop_pad]``
    along each axis, with zeros shifted in (equivalent to zero-padding by
    ``crop_pad`` and cropping back to ``H x W`` at a random position); ``reflect``:
    the image reflected at its border (``F.pad``'s ``reflect``, without the
    repeated edge pixel) is shifted in instead, as an index map, so any dtype
    works. Then each sample is mirrored left-right with probability 0.5, or
    where the bool ``[B]`` ``mirror`` says (a caller's derandomised flip). One
    pass for the whole batch: no Python loop over samples and no host-device
    synchronisation.

    Random draws, in order: crop row starts ``[B]``, crop column starts ``[B]``
    (both only when ``crop_pad > 0``), flip coin ``[B]`` (only when ``flip``
    and no ``mirror`` is given). The result is therefore deterministic given
    the generator state.

    ``crop_pad == 0`` and ``flip == False`` returns ``x`` itself. The user's
    ``data.augment.crop_pad`` is range-checked by :class:`AugmentConfig`; a negative
    ``crop_pad`` here is a programming error (ValueError).
    """
    crop_pad = int(crop_pad)
    if crop_pad < 0:
        raise ValueError(f"augment expects crop_pad >= 0, got {crop_pad}")
    if crop_pad == 0 and not flip:
        return x
    if x.dim() != 4:
        raise ValueError(f"augment expects a [B, C, H, W] batch, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    dev = x.device
    out = x
    if crop_pad > 0:
        p = crop_pad
        if reflect and p >= min(h, w):
            raise ValueError(f"reflect padding needs crop_pad < image size, got {p} for {h}x{w}")
        top = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
        left = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
        rows = top[:, None] + torch.arange(h, device=dev)[None, :]  # [B, H], into the padded image
        cols = left[:, None] + torch.arange(w, device=dev)[None, :]  # [B, W]
        if reflect:  # padded index i is source index |i - p|, mirrored again past the far edge
            rows = (h - 1) - ((h - 1) - (rows - p).abs()).abs()
            cols = (w - 1) - ((w - 1) - (cols - p).abs()).abs()
            source, width = x, w
        else:
            source, width = F.pad(x, (p, p, p, p)), w + 2 * p  # zeros, [B, C, H+2p, W+2p]
        # Gather rows, then columns; indices broadcast over channels.
        out = torch.gather(source, 2, rows[:, None, :, None].expand(b, c, h, width))
        out = torch.gather(out, 3, cols[:, None, None, :].expand(b, c, h, w))
    if flip:
        coin = mirror if mirror is not None else torch.rand((b,), generator=generator, device=dev) < 0.5
        out = torch.where(coin[:, None, None, None], out.flip(3), out)
    return out
