"""Sizing the Ray a job starts itself (issue 23): ``--object-store-memory`` and ``--spill-dir``
reach ``ray.init``, objects that do not fit the store spill to that folder, and the scheduler's
budget of open stories follows the object store. The one-line errors of the options are in
test_efficiency.py; a render through a Ray the job starts is in test_progress_lines.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from storysync_dist.distributed.cluster import OBJECT_STORE_SHARE, connect, object_store_budget

STORE = 100 * 1024 * 1024


def test_the_embedded_ray_takes_the_object_store_size_and_spills_to_the_folder(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    connect(None, 1, object_store_memory=STORE, spill_dir=str(spill))
    try:
        assert ray.cluster_resources()["object_store_memory"] == STORE
        assert object_store_budget() == int(OBJECT_STORE_SHARE * STORE)
        # Four 40 MB objects, all referenced, do not fit 100 MB: Ray spills some to the folder.
        refs = [ray.put(np.full(40 * 1024 * 1024, k, dtype=np.uint8)) for k in range(4)]
        assert spill.is_dir() and any(path.is_file() for path in spill.rglob("*"))
        assert [int(ray.get(ref)[0]) for ref in refs] == [0, 1, 2, 3]  # restored from the spill
    finally:
        ray.shutdown()
