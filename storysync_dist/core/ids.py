"""Story and frame ids, and the seed range: the rules every layer shares.

Kept free of imports beyond ``re`` so that ``core`` (bundle format), ``io`` (output paths) and
``spec`` (story files) can all use them without importing each other.
"""

from __future__ import annotations

import re

__all__ = ["ID_PATTERN", "MAX_SEED", "is_valid_id"]

# Story and frame ids end up in output paths (part files, image paths), so they are restricted to a
# set of characters that is safe on every filesystem and object store, and never contains "/" or "..".
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
# Seeds are stored as Parquet int64 and fed to torch.Generator.manual_seed: keep them in int64 range.
MAX_SEED = 2**63 - 1


def is_valid_id(value: str) -> bool:
    """Return True when ``value`` is a valid story or frame id (``ID_PATTERN``)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None
