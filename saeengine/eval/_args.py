"""The argument checks the evaluation modules share."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def count(name: str, value, low: int = 1) -> int:
    """``value`` as an int >= ``low``; ConfigError naming ``name`` otherwise."""
    if not is_int(value) or value < low:
        raise ConfigError(f"{name}={value!r} must be an int >= {low}")
    return int(value)
