"""Shared test setup: presets build into a per-session cache, never into the user's home."""

from __future__ import annotations

import os
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if "STORYSYNC_CACHE" not in os.environ:
        os.environ["STORYSYNC_CACHE"] = tempfile.mkdtemp(prefix="storysync-test-cache-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Every Ray the tests start listens on 127.0.0.1 only (Ray's single-machine mode); set before
    # any test module imports ray, which reads it at import.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
