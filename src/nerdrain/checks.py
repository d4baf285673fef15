"""Argument checks shared by the configuration dataclasses."""

from __future__ import annotations

import math
import numbers


def whole_number(value: object) -> int | None:
    """``value`` as an ``int`` where it is a whole number (``16``, ``np.int64(16)``, ``16.0``),
    else ``None``; ``True``/``False`` are not numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None
