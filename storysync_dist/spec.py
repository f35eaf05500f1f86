"""Deprecated alias of :mod:`storysync_dist.story` (the story file's schema and loading), kept for
one release: the package was renamed because "spec" reads as "tests" to many people and tools."""

from __future__ import annotations

import warnings

from .story import *  # noqa: F403
from .story import __all__  # noqa: F401

warnings.warn("storysync_dist.spec is renamed storysync_dist.story; import from there", DeprecationWarning,
              stacklevel=2)
