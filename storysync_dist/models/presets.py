"""The offline presets, by name: the public names of ``storysync_dist.models`` for them and for loading.

The presets (`tiny-sd`, `tiny-sdxl`, `tiny-flux`, `tiny-kandinsky3`) are the real diffusers pipeline
classes with tiny configs and seeded random weights. They exist so that tests, CI and laptops exercise
exactly the code paths a real checkpoint goes through (attention processors at two decoder resolutions,
SDXL's text_time conditioning, two text encoders, `vae_scale_factor == 8`) without network access or a
GPU. Each preset is built once, written with `save_pretrained` and always loaded back with
`from_pretrained`, so the real loading path runs every time.

`toyworld` is a trained model, not random weights: the quality instrument's
``StableDiffusionPipeline`` (issue 21, ``docs/quality.md``), trained by ``train/train_toyworld.py``
and shipped as a pipeline folder (``Preset.folder``), which loads like any local folder.

`random-sdxl` and `random-flux` are the other exception: full-size architectures with seeded random
weights, for benchmarks (real compute, noise pictures). Saving them would cost more than building them,
so `loading.load_pipeline` builds them in memory, directly in the requested dtype and on the requested
device; only their configs and tokenizers are written to disk (for `load_model_info`).

Where each piece lives (this module imports them all; nothing in ``models/`` imports this one):
each family defines its presets (``ModelFamily.presets``: ``unet_presets``, ``flux_presets``,
``kandinsky3``); what a preset is and how it is built is ``preset_build``; the table of every
family's presets (``PRESETS``) and their on-disk cache (``preset_path``) are the registry's
(``registry``); `load_pipeline`, which turns any model string (preset, local folder, cached hub id)
into a pipeline, is ``loading``, and the folder and hub-id checks it runs are ``hub``.
"""

from __future__ import annotations

from storysync_dist.cache import cache_root

from .family import UnknownModelError
from .hub import cached_snapshot, check_model_index, looks_like_hub_id
from .loading import load_pipeline
from .preset_build import PRESET_VERSION, Preset
from .registry import PRESETS, preset_path

__all__ = [
    "PRESETS", "PRESET_VERSION", "Preset", "UnknownModelError", "cache_root", "cached_snapshot",
    "check_model_index", "load_pipeline", "looks_like_hub_id", "preset_path",
]
