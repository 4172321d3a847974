"""Image augmentation shared by pretraining and augmentation multiplicity (`finetune.augmult`).

Every random number comes from the generator passed in (a CPU generator; the draws move to the
images' device), so a seeded generator gives the same augmented batch on every replay."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Per-sample random horizontal flip and translation by up to `shift` pixels (background fill)."""
    n, c, h, w = x.shape
    device = x.device
    flip = (torch.rand(n, generator=gen) < 0.5).to(device)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (shift,) * 4, value=float(x.min()))
    dy, dx = (torch.randint(0, 2 * shift + 1, (n,), generator=gen).to(device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
    index_n = torch.arange(n, device=device)[:, None, None, None]
    index_c = torch.arange(c, device=device)[None, :, None, None]
    return padded[index_n, index_c, rows, cols]
