"""Stand-in for torchvision.transforms.functional.resize (test-only shim)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, size: tuple[int, int], *args: object, **kwargs: object) -> torch.Tensor:
    batched = x if x.ndim == 4 else x[None]
    out = F.interpolate(batched.float(), size=tuple(size), mode="bilinear")
    return out if x.ndim == 4 else out[0]
