"""Shared test setup: presets build into a per-session cache, never into the user's home."""

from __future__ import annotations

import os
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if "STORYSYNC_CACHE" not in os.environ:
        os.environ["STORYSYNC_CACHE"] = tempfile.mkdtemp(prefix="storysync-test-cache-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
