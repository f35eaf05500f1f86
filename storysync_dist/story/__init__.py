"""The story file: loading, validation and prompt rendering.

A story is a YAML or JSON file (chosen by extension: ``.yaml``/``.yml``/``.json``)::

    id: ginger-cat
    style: "A watercolor illustration of"
    subjects:
      - name: cat
        description: "a ginger cat with a blue scarf"
        tokens: ["cat"]
    anchors: [beach, kitchen]
    defaults: {steps: 20, height: 256, width: 256, guidance_scale: 5.0, seed: 0, negative_prompt: ""}
    storysync: {rfh_gamma: 0.5, share_layers: [up_blocks]}
    frames:
      - id: beach
        prompt: "{cat} running on a beach at sunset"
        seed: 7
      - prompt: "{cat} reading a book in a kitchen"

Every ``defaults`` entry may be left out: ``seed`` is then 0, and ``steps``, ``height``, ``width``,
``guidance_scale`` are ``None``, the model's own defaults (resolved by the engine); a left-out
``negative_prompt`` is ``None``, no negative prompt at all as in stock ``pipe(prompt)``, while an
explicit one (even ``""``) is used as written. ``storysync:`` holds StorySync method options (the
fields of ``storysync_dist.core.config.StorySyncConfig``), checked at load time.

``load_story`` turns it into a validated, immutable ``StorySpec`` (model-independent checks);
``validate_for_model`` adds the checks that need the model's tokenizer and latent size factor and
returns the subject-token positions the engine needs for the masks. Every problem is reported as a
one-line ``StorySpecError`` naming the file and, where relevant, the frame (id and 0-based index).
``load_benchmark`` turns a benchmark prompt file (the ConsiStory+ shape: categories of subject sets)
into many one-subject stories.

Deliberately plain Python + pydantic + yaml: no torch, diffusers or ray here, so the CLI can validate
a story before it starts anything heavy.

The package, one job per module: ``schema`` (the pydantic models, the seed-range check),
``loading`` (reading and resolving a story file), ``benchmark`` (benchmark prompt sets),
``model_checks`` (checks that need the model's tokenizer); ids and the seed range come from
``storysync_dist.core.ids``.
"""

from __future__ import annotations

from ..core.ids import ID_PATTERN, MAX_SEED, is_valid_id
from .benchmark import BENCHMARK_SUBJECT, load_benchmark, slug
from .loading import load_story
from .model_checks import validate_for_model
from .schema import Defaults, Frame, SeedRangeError, StorySpec, Subject, check_seed

__all__ = [
    "BENCHMARK_SUBJECT",
    "ID_PATTERN",
    "MAX_SEED",
    "Defaults",
    "Frame",
    "SeedRangeError",
    "StorySpec",
    "Subject",
    "check_seed",
    "is_valid_id",
    "load_benchmark",
    "load_story",
    "slug",
    "validate_for_model",
]
