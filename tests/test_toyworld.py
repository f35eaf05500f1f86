"""Toyworld (issue 21): the world's pictures, prompts and masks, and the oracle that reads them
back. The oracle is checked against the world's own truth on hundreds of seeded scenes, clean and
blurred with noise (what a small diffusion model draws is not crisp)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from storysync_dist.toyworld.oracle import read_image, score_frame
from storysync_dist.toyworld.world import (
    ACCESSORIES,
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    PATTERNS,
    PLACES,
    Identity,
    Placed,
    Scene,
    identities,
    prompt_of,
    random_scene,
    render,
    scene_of_prompt,
)


def _truth(scene: Scene) -> list[tuple[str, str, str]]:
    return sorted((o.cls, o.place, o.identity.label()) for o in scene.objects)


def test_the_world_has_36_identities_and_no_prompt_names_one() -> None:
    assert len(identities()) == len(set(identities())) == 6 * 3 * 2
    rng = np.random.default_rng(0)
    words = set(COLOURS) | set(PATTERNS) | {"hat"}
    for _ in range(300):
        scene = random_scene(rng)
        prompt = prompt_of(scene)
        assert not words & set(prompt.replace(",", " ").split()), prompt
        # The grammar reads back what it wrote: classes in their places, the background.
        asked = scene_of_prompt(prompt)
        assert asked.background == scene.background and asked.kind == scene.kind
        assert sorted((o.cls, o.place) for o in asked.objects) == sorted((o.cls, o.place) for o in scene.objects)


def test_a_group_shares_one_identity_and_a_pair_names_each_class_in_its_place() -> None:
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng) for _ in range(400)]
    groups = [s for s in scenes if s.kind == "group"]
    assert groups and all(len({o.identity for o in s.objects}) == 1 and len({o.cls for o in s.objects}) == 1
                          for s in groups)
    pairs = [s for s in scenes if s.kind == "pair"]
    assert pairs and all(prompt_of(s).startswith(f"a {s.objects[0].cls} {s.objects[0].place} of a {s.objects[1].cls}")
                         and {o.place for o in s.objects} == {"left", "right"} for s in pairs)
    # Either object is named first (a story's subject always can be), each about half the time.
    assert 0.3 < np.mean([s.objects[0].place == "right" for s in pairs]) < 0.7


def test_the_masks_are_exactly_the_pixels_of_each_object() -> None:
    rng = np.random.default_rng(2)
    for _ in range(100):
        scene = random_scene(rng)
        image, masks = render(scene)
        background = np.array(BACKGROUNDS[scene.background], np.uint8)
        union = np.zeros(image.shape[:2], bool)
        for mask in masks:
            assert mask.sum() > 40 and not (mask & union).any()  # objects never overlap
            union |= mask
        assert (image[~union] == background).all()
        assert not (image[union] == background).all(axis=1).any()


def test_the_oracle_reads_every_clean_picture_exactly() -> None:
    rng = np.random.default_rng(3)
    for _ in range(250):
        scene = random_scene(rng)
        image, masks = render(scene)
        reading = read_image(image)
        assert reading.background == scene.background
        assert sorted((o.cls, o.place, o.identity.label()) for o in reading.objects) == _truth(scene), prompt_of(scene)
        # Its regions are the objects' masks.
        for found in reading.objects:
            best = max(float((found.mask & m).sum()) / float((found.mask | m).sum()) for m in masks)
            assert best == 1.0


@pytest.mark.parametrize(("blur", "noise", "tolerated"), [(0.8, 6.0, 0.02), (1.0, 10.0, 0.06)])
def test_the_oracle_reads_blurred_noisy_pictures(blur: float, noise: float, tolerated: float) -> None:
    """Measured on 300 scenes (seed 2): at blur 0.8 px and noise 6 about 0.3 % of the attributes
    are misread, at blur 1.0 and noise 10 about 3 % (mostly yellow read as lime); the bounds leave
    room for the seed's spread (docs/quality.md)."""
    rng = np.random.default_rng(4)
    wrong = total = misplaced = 0
    for _ in range(200):
        scene = random_scene(rng)
        image, _ = render(scene)
        blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur))).astype(np.float32)
        noisy = np.clip(blurred + rng.normal(0, noise, blurred.shape), 0, 255).astype(np.uint8)
        reading = read_image(noisy)
        assert reading.background == scene.background
        if sorted((o.cls, o.place) for o in reading.objects) != sorted((o.cls, o.place) for o in scene.objects):
            misplaced += 1
            continue
        key = lambda o: (o.place, o.cls, o.identity.label())  # noqa: E731
        for want, got in zip(sorted(scene.objects, key=key), sorted(reading.objects, key=key)):
            for name in ("colour", "pattern", "accessory"):
                total += 1
                wrong += getattr(want.identity, name) != getattr(got.identity, name)
    assert misplaced <= 0.03 * 200, misplaced
    assert wrong <= tolerated * total, (wrong, total)


def test_a_frame_is_adherent_only_with_its_background_and_classes_in_their_places() -> None:
    subject = Identity("red", "spot", "hat")
    good = Scene("forest", (Placed("ball", "left", subject),), "single")
    image, _ = render(good)
    score = score_frame(image, "a ball on the left in the forest")
    assert score.adherent and score.subject == subject and score.background == "forest"
    for prompt in ("a ball on the right in the forest", "a ball on the left on the beach", "a tent on the left in the forest"):
        assert not score_frame(image, prompt).adherent, prompt
    assert score_frame(image, "a tent on the left in the forest").subject is None
    extra, _ = render(Scene("forest", (Placed("ball", "left", subject), Placed("log", "right", subject)), "pair"))
    assert not score_frame(extra, "a ball on the left in the forest").adherent  # an object not asked for
    with pytest.raises(ValueError, match=r"no background in .a cat on a sofa."):
        scene_of_prompt("a cat on a sofa")


def test_the_tables_are_far_apart_enough_to_read() -> None:
    """Every body colour is far from every background (the foreground threshold is 48) and from
    every other body colour, also in its darker lower half."""
    from storysync_dist.toyworld.world import DARKER, HAT

    colours = {n: np.array(c, float) for n, c in COLOURS.items()}
    for name, colour in colours.items():
        for background in BACKGROUNDS.values():
            assert np.linalg.norm(colour - background) > 90 and np.linalg.norm(colour * DARKER - background) > 70
        assert min(np.linalg.norm(colour - other) for n, other in colours.items() if n != name) > 80
        assert np.linalg.norm(colour - np.array(HAT)) > 150
    assert len(CLASSES) == 4 and len(PLACES) == 3 and ACCESSORIES == ("none", "hat")
