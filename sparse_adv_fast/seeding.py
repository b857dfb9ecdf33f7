"""One way to derive a seed from several numbers (a run's seed and an epoch, a rank, a
batch index), so every derived stream in the library is unrelated to its neighbours."""

from __future__ import annotations

import numpy as np


def derive_seed(*words: int) -> int:
    """A 63-bit seed of the tuple ``words``.

    ``SeedSequence`` mixes the whole tuple, so neighbouring tuples give unrelated streams
    (``seed + epoch`` would make seed 0 epoch 2 repeat seed 1 epoch 1).
    """
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


__all__ = ["derive_seed"]
