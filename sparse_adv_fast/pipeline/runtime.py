"""Process settings for a run: how many CPU threads torch uses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Datasets whose ops are too small to split across threads (8x8 inputs): extra threads only
# contend. Measured on a busy 2-core machine: a small_cnn PGD-AT epoch on digits ran several
# times slower with 2 threads than with 1.
SINGLE_THREAD = frozenset({"digits"})


@contextlib.contextmanager
def threads_for(dataset: str) -> Iterator[None]:
    """Use one torch thread for tiny-input datasets within the block; restore afterwards."""
    prev = torch.get_num_threads()
    if dataset in SINGLE_THREAD and prev != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)
