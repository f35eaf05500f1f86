"""Sizes in bytes as people write them: ``8589934592``, ``8G``, ``512MiB``, ``1.5g``."""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of ``text``: a number with an optional K/M/G/T suffix (powers of 1024, an optional
    ``B``/``iB`` after it). Raises ValueError for anything else."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size in bytes (e.g. 8589934592, 8G, 512MiB)")
    scale = 1024 ** "_kmgt".index(match.group(2).lower() or "_")
    return int(float(match.group(1)) * scale)
