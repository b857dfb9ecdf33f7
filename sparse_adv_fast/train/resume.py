"""What ``fit`` checks before it resumes from a checkpoint.

A resumed run must end where the uninterrupted run would. That holds only if the file is
a ``fit`` checkpoint of this model, written with the same settings, and holds finite
weights; anything else is refused with a :class:`CheckpointError` (or
:class:`NonFiniteError`) naming the file, and the file is left as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..checkpoint import CheckpointError
from ..finite import check_finite

FORMAT = "sparse_adv_fast.fit/2"
# fit/1 recorded only the optimizer and schedule, so a changed epochs (and with it the lr
# schedule) resumed silently.
_OLD_FORMATS = ("sparse_adv_fast.fit/1",)
CKPT_KEYS = ("epoch", "method", "config", "stopped", "model", "optimizer", "scheduler", "rng",
             "history", "detector", "rewind_state")
_UNRECORDED = "<not recorded>"


def loader_facts(loader: Any) -> dict[str, int | None]:
    """Batch size and sample count of a train loader (``None`` where it does not say)."""
    batch_size = getattr(loader, "batch_size", None)
    dataset = getattr(loader, "dataset", None)
    try:
        size = len(dataset) if dataset is not None else None
    except TypeError:  # an IterableDataset without __len__
        size = None
    return {"batch_size": batch_size if isinstance(batch_size, int) else None,
            "train_size": size}


def check_format(path: Path, saved: Any) -> None:
    """Refuse anything that is not a complete checkpoint of the current format."""
    fmt = saved.get("format") if isinstance(saved, dict) else None
    if fmt in _OLD_FORMATS:
        raise CheckpointError(
            f"checkpoint {path} has the older format {fmt!r}, which did not record the "
            "training settings, so an identical resume cannot be checked; delete it or pass "
            "resume=False to start over"
        )
    if fmt != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a sparse_adv_fast fit checkpoint "
                              f"(expected format {FORMAT!r})")
    absent = sorted(set(CKPT_KEYS) - set(saved))
    if absent:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {absent}")
    if not isinstance(saved["config"], Mapping):
        raise CheckpointError(f"checkpoint {path} is malformed: 'config' is not a mapping")


def check_settings(path: Path, saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, listing every difference.

    Any difference would continue the run on another trajectory (a changed ``epochs``
    alone changes every later learning rate), which is a silent wrong answer.
    """
    diffs = [
        f"{k}={saved.get(k, _UNRECORDED)!r}, now {k}={now.get(k, _UNRECORDED)!r}"
        for k in sorted(set(saved) | set(now), key=_order(now))
        if saved.get(k, _UNRECORDED) != now.get(k, _UNRECORDED)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written with {'; '.join(diffs)}; resume with the same "
            "settings, or pass resume=False (or delete the file) to start over"
        )


def _order(now: Mapping[str, Any]):
    # Differences are listed in fit's argument order, unknown (saved-only) keys last.
    rank = {k: i for i, k in enumerate(now)}
    return lambda k: (rank.get(k, len(rank)), k)


def check_model_state(path: Path, saved: Mapping[str, Tensor], model: nn.Module) -> None:
    """Refuse a checkpoint whose state_dict keys or shapes differ from ``model``'s."""
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = sorted(k for k in set(own) & set(saved)
                    if tuple(own[k].shape) != tuple(saved[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if shapes:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
                for k in shapes[:5]))
        raise CheckpointError(
            f"checkpoint {path} was written for a different model: {'; '.join(parts)}"
        )


def check_saved_finite(path: Path, saved: Mapping[str, Any]) -> None:
    """Refuse a checkpoint holding NaN/Inf in the model or in a state fit may load later.

    A finished NaN checkpoint would otherwise be "resumed" to a success; the file is kept
    so that the user can look at it.
    """
    where = f"fit: refusing to resume from checkpoint {path}"
    check_finite(saved["model"], where)
    if isinstance(saved["rewind_state"], Mapping):
        check_finite(saved["rewind_state"], f"{where} (rewind_state)")
    detector = saved["detector"]
    if isinstance(detector, Mapping) and isinstance(detector.get("best_state"), Mapping):
        check_finite(detector["best_state"], f"{where} (best-epoch state)")


__all__ = ["CKPT_KEYS", "FORMAT", "check_format", "check_model_state", "check_saved_finite",
           "check_settings", "loader_facts"]
