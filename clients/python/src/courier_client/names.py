"""Message names and subscription patterns (``docs/PROTOCOL.md`` §8.2).

A name is one or more dot-separated segments of ``a-z``, ``0-9``, ``_``
and ``-``, at most 255 bytes. A pattern may also use ``*`` (exactly one
segment) and, as its last segment, ``>`` (one or more segments).

>>> pattern_matches("todo.*", "todo.created"), pattern_matches("todo.>", "todo")
(True, False)
"""

from __future__ import annotations

import re

from .errors import InvalidName

__all__ = ["NAME_BYTES_MAX", "validate_name", "validate_pattern", "pattern_matches"]

NAME_BYTES_MAX = 255

_SEGMENT = re.compile(r"[a-z0-9_-]+")
_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


def validate_name(name: str) -> None:
    """Raises :class:`InvalidName` saying what is wrong with ``name``."""
    if _NAME.fullmatch(name) and len(name) <= NAME_BYTES_MAX:
        return
    _explain(name, "name", wildcards=False)


def validate_pattern(pattern: str) -> None:
    """Raises :class:`InvalidName` saying what is wrong with ``pattern``."""
    _explain(pattern, "pattern", wildcards=True)


def _explain(text: str, what: str, wildcards: bool) -> None:
    if not text:
        raise InvalidName(f"{what} is empty")
    size = len(text.encode())
    if size > NAME_BYTES_MAX:
        raise InvalidName(f"{what} is {size} bytes long; at most {NAME_BYTES_MAX} are allowed")
    segments = text.split(".")
    for i, segment in enumerate(segments):
        if not segment:
            raise InvalidName(
                f"{what} {text!r} has an empty segment (two dots in a row, or a dot at an end)"
            )
        if wildcards and segment == "*":
            continue
        if wildcards and segment == ">":
            if i != len(segments) - 1:
                raise InvalidName(
                    f"pattern {text!r} uses '>' before its last segment; '>' matches the rest and must come last"
                )
            continue
        if _SEGMENT.fullmatch(segment):
            continue
        if wildcards and ("*" in segment or ">" in segment):
            raise InvalidName(
                f"pattern {text!r} mixes a wildcard with other characters in one segment; "
                "use '*' or '>' as a whole segment"
            )
        bad = next(c for c in segment if not _SEGMENT.fullmatch(c))
        raise InvalidName(
            f"{what} {text!r} has the character {bad!r}; names use only a-z, 0-9, '.', '_' and '-'"
        )


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` (both assumed valid)."""
    if pattern == name:
        return True
    p = pattern.split(".")
    n = name.split(".")
    for i, segment in enumerate(p):
        if segment == ">":
            return len(n) > i
        if i >= len(n) or (segment != "*" and segment != n[i]):
            return False
    return len(n) == len(p)
