"""The frame table's schema: one row per frame, an ``image`` column that Hugging Face ``datasets``
reads as an Image, and the feature metadata that tells it so."""

from __future__ import annotations

import json

import pyarrow as pa

__all__ = ["FRAME_SCHEMA", "HF_FEATURES", "IMAGE_TYPE"]

# The struct layout (field order included) that `datasets.Image` uses as its Arrow storage type.
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

# `datasets` feature descriptions, in schema order. `datasets.Features.from_arrow_schema` uses a
# feature from this metadata only when its Arrow type equals the column's type (nullable included),
# so every field below stays nullable and `image` is exactly IMAGE_TYPE.
HF_FEATURES: dict[str, dict[str, str]] = {
    "story_id": {"dtype": "string", "_type": "Value"},
    "frame_id": {"dtype": "string", "_type": "Value"},
    "frame_index": {"dtype": "int32", "_type": "Value"},
    "prompt": {"dtype": "string", "_type": "Value"},
    "seed": {"dtype": "int64", "_type": "Value"},
    "image": {"_type": "Image"},
    "width": {"dtype": "int32", "_type": "Value"},
    "height": {"dtype": "int32", "_type": "Value"},
    "model": {"dtype": "string", "_type": "Value"},
    "method": {"dtype": "string", "_type": "Value"},
    "config": {"dtype": "string", "_type": "Value"},
    "mask": {"dtype": "binary", "_type": "Value"},
    "is_anchor": {"dtype": "bool", "_type": "Value"},
    "render_seconds": {"dtype": "float64", "_type": "Value"},
    "fingerprint": {"dtype": "string", "_type": "Value"},
}

FRAME_SCHEMA = pa.schema(
    [
        pa.field("story_id", pa.string()),
        pa.field("frame_id", pa.string()),
        pa.field("frame_index", pa.int32()),
        pa.field("prompt", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("image", IMAGE_TYPE),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("method", pa.string()),
        pa.field("config", pa.string()),
        pa.field("mask", pa.binary()),
        pa.field("is_anchor", pa.bool_()),
        pa.field("render_seconds", pa.float64()),
        pa.field("fingerprint", pa.string()),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})},
)
