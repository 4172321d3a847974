"""One split of a data set (images, labels, stable ids) and the error for data that cannot be had."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError


class DataError(UserError, RuntimeError):
    """The data set cannot be found or read; the message lists the ways to get it."""


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 (N, C, H, W)
    y: np.ndarray  # int64 (N,)
    ids: np.ndarray  # int64 (N,), stable ids in the canonical training split
