"""Trivial stand-ins for torchvision.transforms (see the package docstring: test-only shim)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import functional


class Compose:
    def __init__(self, transforms: list[Any]) -> None:
        self.transforms = transforms

    def __call__(self, x: Any) -> Any:
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:
    """HWC array -> CHW float tensor (no uint8 scaling: the shim is never used for real images)."""

    def __call__(self, x: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float32)).permute(2, 0, 1)


class Normalize:
    def __init__(self, mean: Any, std: Any) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


__all__ = ["Compose", "Normalize", "ToTensor", "functional"]
