"""Numbers in protocol text, parsed by an ASCII-only grammar.

`str.isdigit()` is true for '²', '٣' and hundreds of other Unicode digits that `int()` then
refuses (or, for some, accepts as other values): never use it to guard `int()` on bytes a peer
sent. These helpers accept exactly `[0-9]+` of a bounded length and return None otherwise.
"""

from __future__ import annotations


def decimal(text: str, max_digits: int = 18) -> int | None:
    """A non-negative decimal integer spelled in ASCII digits; None for anything else."""
    if not (0 < len(text) <= max_digits and text.isascii() and text.isdigit()):
        return None
    return int(text)


def port_number(text: str) -> int | None:
    """A TCP port, 1-65535, in ASCII digits; None for anything else."""
    n = decimal(text, 5)
    return n if n is not None and 0 < n < 65536 else None
