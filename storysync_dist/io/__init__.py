"""Output: frames as a Parquet dataset on any fsspec filesystem, and the storyboard image.

Knows Parquet, fsspec and PIL only (no torch, diffusers or ray).
"""

from .sink import (
    DATA_DIR,
    FRAME_SCHEMA,
    HF_FEATURES,
    MANIFEST_NAME,
    STORYBOARD_NAME,
    FrameRecord,
    ParquetFrameSink,
    StoredFrame,
    dataset_files,
    open_dataset,
    part_name,
    read_manifest,
    write_bytes,
    write_manifest,
)
from .storyboard import make_storyboard, png_bytes

__all__ = [
    "DATA_DIR",
    "FRAME_SCHEMA",
    "HF_FEATURES",
    "MANIFEST_NAME",
    "STORYBOARD_NAME",
    "FrameRecord",
    "ParquetFrameSink",
    "StoredFrame",
    "dataset_files",
    "make_storyboard",
    "open_dataset",
    "part_name",
    "png_bytes",
    "read_manifest",
    "write_bytes",
    "write_manifest",
]
