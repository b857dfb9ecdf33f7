"""What every written report needs: strict-JSON-ready values (``study_report`` writes
``results.json`` through :func:`finite`)."""

from __future__ import annotations

import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with NaN / inf floats replaced by None, recursively (strict JSON has neither)."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


__all__ = ["finite"]
