"""Task functions shared by every contender.

They live at module level in an importable module, so every pool (and the raw-pipe floor)
sends them by reference: no contender pays for serializing a function by value.
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence


def double(x: Any) -> Any:
    """The tiny task of L, T and H."""
    return x * 2


def echo(payload: Any) -> Any:
    """Returns its argument: B sends a payload and gets the same number of bytes back."""
    return payload


def map_chunk(f: Callable[[Any], Any], items: Sequence[Any]) -> List[Any]:
    """Runs f over a whole batch in one call: the raw-pipe floor of ``map``."""
    return [f(x) for x in items]
