"""Small stories and frame jobs the tests share."""

from __future__ import annotations

import pathlib
import textwrap
from typing import Any

from storysync_dist.engine.renderer import FrameJob


def fox_story(frames: int = 4, **defaults: Any) -> dict[str, Any]:
    """A one-subject story of a red fox, as a dict for a story file: ``frames`` scenes (at most 4),
    fixed seeds, and ``defaults`` (steps, height, ...) when given."""
    scenes = [("meadow", "in a meadow"), ("stream", "by a stream"), ("snow", "in the snow"),
              ("city", "in a city at night")]
    story: dict[str, Any] = {
        "id": "fox",
        "style": "A photo of",
        "subjects": [{"name": "fox", "description": "a small red fox", "tokens": ["fox"]}],
        "frames": [{"id": name, "prompt": f"{{fox}} {where}", "seed": 3 + k}
                   for k, (name, where) in enumerate(scenes[:frames])],
    }
    if defaults:
        story["defaults"] = dict(defaults)
    return story


def cat_job(adapter: Any, index: int, scene: str, seed: int, negative: str | None = None) -> FrameJob:
    """A frame job "a photo of a ginger cat <scene>" whose subject tokens are those of "cat" in the
    adapter's tokenizer."""
    prompt = f"a photo of a ginger cat {scene}"
    ids = adapter.tokenizer(prompt).input_ids
    cat = adapter.tokenizer("cat", add_special_tokens=False).input_ids
    positions = [k for k in range(len(ids)) if ids[k : k + len(cat)] == cat]
    return FrameJob(f"f{index}", index, prompt, negative, seed, [positions])


# A three-frame story file (YAML) of one subject, for the story-file tests.
CAT_STORY = """\
id: ginger-cat
style: "A watercolor illustration of"
subjects:
  - name: cat
    description: "a ginger cat with a blue scarf"
    tokens: ["cat"]
defaults: {steps: 20, height: 256, width: 256, guidance_scale: 5.0, seed: 0, negative_prompt: ""}
frames:
  - id: beach
    prompt: "{cat} running on a beach at sunset"
    seed: 7
  - prompt: "{cat} reading a book in a kitchen"
  - id: garden
    prompt: "{cat} in a garden"
"""


def write_story_text(tmp_path: pathlib.Path, text: str, name: str = "story.yaml") -> pathlib.Path:
    """``text`` (dedented) as the file ``name`` in ``tmp_path``."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path
