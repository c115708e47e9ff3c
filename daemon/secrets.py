"""A wrapper that keeps secret strings out of logs, errors and `repr()`."""

from __future__ import annotations

import hmac
from typing import Final

_MASK: Final = "***"


class Secret:
    """A secret string whose `str()` and `repr()` are `***`; call `reveal()` where it is sent."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        """Return the secret itself: only to build the request that needs it, never to log."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return _MASK

    def __str__(self) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # Constant time, so comparing configured secrets leaks nothing through timing.
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would copy the value out of reach of the mask; nothing needs it.
        raise TypeError("Secret cannot be pickled")
