"""JSON from outside the node (SIP bodies, control requests, REST bodies, config files).

`loads()` is `json.loads` with every way it can fail turned into one `JsonError` (a
ValueError) that says what was being read and why: malformed text, bytes that are no UTF,
integers too long to convert — and nesting. CPython's decoder recurses once per level and
raises RecursionError (not a ValueError) somewhere near 1000 levels, depending on how deep
the caller's stack already is; so anything nested deeper than MAX_DEPTH is refused here, the
same way whatever the stack. NaN, Infinity and numbers that overflow a float are not JSON
(RFC 8259 §6) and are refused too: a timeout of NaN seconds is nobody's intent.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # the deepest document the lab uses is its config file, 5 levels


class JsonError(ValueError):
    """`what` is not valid JSON: `detail`."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what} is not valid JSON: {detail}")
        self.what, self.detail = what, detail


def loads(data: bytes | str, what: str = "input") -> Any:
    """Parse one JSON document; JsonError (a ValueError) names `what` and the problem."""
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise JsonError(what, f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise JsonError(what, str(exc)) from None
    if _deeper_than(value, MAX_DEPTH):
        raise JsonError(what, f"nested deeper than {MAX_DEPTH} levels")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]}{'...' if len(text) > 20 else ''} is out of range")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels (iteratively: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False
