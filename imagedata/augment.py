"""Batch augmentation as tensor ops: random crop with zero padding and horizontal flip, whose
parameters can be drawn, stored and replayed (the teacher-output pool shows a student the very view its
stored teacher outputs belong to)."""
from __future__ import annotations

import torch


def draw_views(n: int, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random augmentation parameters per image, int64 [n, 3]: crop offsets (dy, dx) into the image
    zero-padded by ``padding`` on every side, and whether to flip it horizontally (0/1)."""
    params = torch.zeros(n, 3, dtype=torch.long)
    if padding > 0:
        params[:, 0] = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)[:, 0]
        params[:, 1] = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)[:, 0]
    if hflip:
        params[:, 2] = (torch.rand(n, generator=generator) < 0.5).long()
    return params


def apply_views(x: torch.Tensor, params: torch.Tensor, padding: int) -> torch.Tensor:
    """The views ``params`` (from :func:`draw_views`) of a batch: crop with zero padding, then flip."""
    n, c, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = (params[:, :1] + torch.arange(h)).view(n, 1, h, 1)
        cols = (params[:, 1:2] + torch.arange(w)).view(n, 1, 1, w)
        x = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    flip = params[:, 2].bool()
    if bool(flip.any()):
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    return x


def augment_batch(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, for a whole batch."""
    return apply_views(x, draw_views(x.shape[0], padding, hflip, generator), padding)
