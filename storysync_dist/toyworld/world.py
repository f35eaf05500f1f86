"""Toyworld: a procedural world whose truth a program knows (issue 21).

Objects of four classes, each a shape named by its own noun (``ball`` a disc, ``tower`` a tall
bar, ``log`` a wide bar, ``tent`` a triangle: shapes that a blurred picture still tells apart), stand in one of three places (``left``, ``middle``,
``right``) on one of four named backgrounds (``beach``, ``forest``, ``lake``, ``city``). An
object's **identity** is its body colour x pattern x accessory (6 x 3 x 2 = 36), and a prompt never
names it: a model that learned the world draws a random identity for each seed, which is the
inconsistency a story method must remove.

What the data teaches, and why (facts from an earlier attempt, issue 21):
- scenes of two or three objects of distinct classes whose places are bound to their nouns
  ("a ball right of a tent on the beach"): a noun's cross-attention must find its object to
  render the scene right, so subject-token masks localize;
- scenes of two to four *identical* instances of one class ("three towers in the city"), the
  identity unnamed: self-attention learns to copy appearance from one region to another, which
  is what extended attention to the anchors relies on.

Everything here is numpy and PIL: the training data (``render``), the prompts (``prompt_of``)
and the oracle scorer (``toyworld.oracle``) read the same tables, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ACCESSORIES",
    "BACKGROUNDS",
    "CLASSES",
    "COLOURS",
    "COUNT_WORDS",
    "PATTERNS",
    "PLACES",
    "SIZE",
    "Identity",
    "Placed",
    "Scene",
    "identities",
    "object_mask",
    "plural",
    "prompt_of",
    "random_scene",
    "render",
    "scene_of_prompt",
    "shape_mask",
    "shape_test",
]

SIZE = 64  # pixels, both sides
CLASSES = ("ball", "tower", "log", "tent")
PLACES = {"left": 11, "middle": 32, "right": 53}  # x centre of each place, pixels
BACKGROUNDS = {  # named in every prompt; far from every body colour
    "beach": (228, 206, 152),
    "forest": (34, 84, 40),
    "lake": (52, 96, 186),
    "city": (164, 164, 172),
}
COLOURS = {  # body colours: never named in a prompt
    "red": (222, 38, 38),
    "orange": (244, 136, 24),
    "yellow": (246, 226, 36),
    "purple": (136, 52, 196),
    "pink": (246, 120, 196),
    "lime": (150, 232, 60),
}
PATTERNS = ("plain", "halves", "spot")  # halves: the lower half a darker shade; spot: a white centre
ACCESSORIES = ("none", "hat")  # hat: a black bar on top
HAT = (16, 16, 16)
HAT_HEIGHT, HAT_HALF_WIDTH = 4, 5  # pixels
SPOT = (250, 250, 250)
SPOT_RADIUS = 2.55  # pixels
DARKER = 0.6  # the lower half of a "halves" body, as a fraction of the body colour
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
RADIUS = 7  # half the width of an object's body, pixels
Y_CENTRE = 34


@dataclass(frozen=True)
class Identity:
    """What makes a character itself: body colour, pattern, accessory (never in a prompt)."""

    colour: str
    pattern: str
    accessory: str

    def label(self) -> str:
        return f"{self.colour}/{self.pattern}/{self.accessory}"


def identities() -> list[Identity]:
    """Every identity of the world, in a fixed order."""
    return [Identity(c, p, a) for c in COLOURS for p in PATTERNS for a in ACCESSORIES]


@dataclass(frozen=True)
class Placed:
    """One object of a scene: its class, place, identity and the pixel offset of its centre."""

    cls: str
    place: str
    identity: Identity
    dx: int = 0
    dy: int = 0


@dataclass(frozen=True)
class Scene:
    """A picture's truth: background and objects, and the prompt ``kind`` that names them
    (``single``: "a ball on the left ...", ``pair``: "a ball left of a tent ..." or "a ball right
    of a tent ...", the first object named first, ``group``:
    "three towers ...", identical instances)."""

    background: str
    objects: tuple[Placed, ...]
    kind: str = "single"


def plural(cls: str) -> str:
    return cls + "s"


def prompt_of(scene: Scene) -> str:
    """The prompt of a scene: classes, places and background, never an identity."""
    where = f"in the {scene.background}" if scene.background != "beach" else "on the beach"
    objects = scene.objects
    if scene.kind == "single":
        (one,) = objects
        place = "in the middle" if one.place == "middle" else f"on the {one.place}"
        return f"a {one.cls} {place} {where}"
    if scene.kind == "pair":
        # Either object may be named first, so a story's subject always can be ("a ball right of a
        # tent"): the first noun is bound to its own place.
        first, second = objects
        return f"a {first.cls} {first.place} of a {second.cls} {where}"
    if scene.kind == "trio":
        return f"a {objects[0].cls}, a {objects[1].cls} and a {objects[2].cls} {where}"
    if scene.kind == "group":
        return f"{COUNT_WORDS[len(objects)]} {plural(objects[0].cls)} {where}"
    raise ValueError(f"unknown scene kind {scene.kind!r}")


def scene_of_prompt(prompt: str) -> Scene:
    """What a prompt asks for, with no identities (``Identity("", "", "")``): the classes in
    their places and the background. ``ValueError`` for a prompt outside the grammar."""
    words = prompt.replace(",", " ").split()
    background = next((b for b in BACKGROUNDS if b in words), None)
    if background is None:
        raise ValueError(f"no background in {prompt!r}")
    blank = Identity("", "", "")
    count = next((n for n, w in COUNT_WORDS.items() if words and words[0] == w), None)
    if count is not None:
        cls = next((c for c in CLASSES if words[1] == plural(c)), None)
        if cls is None:
            raise ValueError(f"no class in {prompt!r}")
        return Scene(background, tuple(Placed(cls, place, blank) for place in group_places(count)), "group")
    named = [w for w in words if w in CLASSES]
    if len(named) == 1 and "of" not in words:
        place = next((p for p in PLACES if p in words), None)
        if place is None:
            raise ValueError(f"no place in {prompt!r}")
        return Scene(background, (Placed(named[0], place, blank),), "single")
    if len(named) == 2 and "of" in words and words[words.index("of") - 1] in ("left", "right"):
        first = words[words.index("of") - 1]
        second = "right" if first == "left" else "left"
        return Scene(background, (Placed(named[0], first, blank), Placed(named[1], second, blank)), "pair")
    if len(named) == 3:
        return Scene(background, tuple(Placed(c, p, blank) for c, p in zip(named, PLACES)), "trio")
    raise ValueError(f"{prompt!r} is not a toyworld prompt")


def group_places(count: int) -> tuple[str, ...]:
    """The places of a group of ``count`` identical objects, left to right (four: two rows)."""
    return {2: ("left", "right"), 3: ("left", "middle", "right"), 4: ("left", "middle", "right", "middle")}[count]


def random_scene(rng: np.random.Generator, kinds: tuple[str, ...] = ("single", "pair", "trio", "group"),
                 weights: tuple[float, ...] | None = None) -> Scene:
    """A training scene: a random kind, classes, places, background and identities (a group
    shares one identity; the objects of a pair or trio each get their own)."""
    pool = identities()
    kind = str(rng.choice(kinds, p=weights))
    background = str(rng.choice(list(BACKGROUNDS)))

    def jitter() -> tuple[int, int]:
        return int(rng.integers(-1, 2)), int(rng.integers(-3, 4))

    if kind == "single":
        objects: tuple[Placed, ...] = (Placed(str(rng.choice(CLASSES)), str(rng.choice(list(PLACES))),
                                              pool[int(rng.integers(len(pool)))], *jitter()),)
    elif kind in ("pair", "trio"):
        count = 2 if kind == "pair" else 3
        classes = rng.permutation(CLASSES)[:count]
        places = tuple(PLACES) if kind == "trio" else tuple(str(p) for p in rng.permutation(["left", "right"]))
        objects = tuple(Placed(str(c), p, pool[int(rng.integers(len(pool)))], *jitter())
                        for c, p in zip(classes, places))
    else:
        count = int(rng.integers(2, 5))
        cls, identity = str(rng.choice(CLASSES)), pool[int(rng.integers(len(pool)))]
        places = group_places(count)
        # Four: two rows in the middle, 26 pixels apart, without vertical jitter (they would touch).
        rows = {1: -13, 3: 13} if count == 4 else {}
        objects = tuple(Placed(cls, p, identity, dx, rows[i] if i in rows else dy)
                        for i, (p, (dx, dy)) in enumerate(zip(places, (jitter() for _ in places))))
    return Scene(background, objects, kind)


def _centre(obj: Placed) -> tuple[int, int]:
    return PLACES[obj.place] + obj.dx, Y_CENTRE + obj.dy


def object_mask(obj: Placed, size: int = SIZE) -> np.ndarray:
    """The body of ``obj`` (its shape, without the hat), ``(size, size)`` bool."""
    cx, cy = _centre(obj)
    return shape_mask(obj.cls, cx, cy, size)


def shape_mask(cls: str, cx: float, cy: float, size: int = SIZE) -> np.ndarray:
    """The body of a ``cls`` centred at pixel ``(cx, cy)``, ``(size, size)`` bool."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return shape_test(cls, x - cx + 0.5, y - cy + 0.5)


def shape_test(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points lie in the body of a ``cls`` centred at the origin: ``u``, ``v`` are pixel
    centres' offsets from it (any shape; the oracle passes a window around an object)."""
    r = RADIUS
    if cls == "ball":
        return u * u + v * v <= r * r
    if cls == "tower":  # tall: twice as high as wide
        return (np.abs(u) <= r // 2 + 0.5) & (np.abs(v) <= r + 1)
    if cls == "log":  # wide: twice as wide as high
        return (np.abs(u) <= r + 1) & (np.abs(v) <= r // 2 + 0.5)
    if cls == "tent":  # apex up: wide at the bottom
        return (v >= -r) & (v <= r) & (np.abs(u) <= (v + r) * 0.5 + 0.5)
    raise ValueError(f"unknown class {cls!r}")


def spot_centre(cls: str, cx: float, cy: float) -> tuple[float, float]:
    """Where the spot of a ``cls`` centred at ``(cx, cy)`` is: the centre, or for a tent lower
    down, where it is wide."""
    return cx, cy + 2 if cls == "tent" else cy


def hat_mask(obj: Placed, body: np.ndarray) -> np.ndarray:
    """The hat of ``obj``: a black bar HAT_HEIGHT pixels tall just above the body's top row."""
    hat = np.zeros_like(body)
    if obj.identity.accessory != "hat" or not body.any():
        return hat
    rows = np.flatnonzero(body.any(axis=1))
    top = int(rows[0])
    cx, _ = _centre(obj)
    hat[max(0, top - HAT_HEIGHT):top, max(0, cx - HAT_HALF_WIDTH):cx + HAT_HALF_WIDTH] = True
    return hat


def render(scene: Scene, size: int = SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """The picture of ``scene`` (``(size, size, 3)`` uint8) and each object's exact mask (body
    and hat), in ``scene.objects`` order. Later objects are drawn over earlier ones."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    masks = []
    for obj in scene.objects:
        body = object_mask(obj, size)
        colour = np.array(COLOURS[obj.identity.colour], np.float32)
        image[body] = colour.astype(np.uint8)
        if obj.identity.pattern == "halves":
            rows = np.flatnonzero(body.any(axis=1))
            middle = (int(rows[0]) + int(rows[-1]) + 1) // 2
            lower = body.copy()
            lower[:middle] = False
            image[lower] = (colour * DARKER).astype(np.uint8)
        elif obj.identity.pattern == "spot":
            cx, cy = _centre(obj)
            y, x = np.mgrid[0:size, 0:size]
            sx, sy = spot_centre(obj.cls, cx, cy)
            spot = body & ((x - sx + 0.5) ** 2 + (y - sy + 0.5) ** 2 <= SPOT_RADIUS**2)
            image[spot] = SPOT
        hat = hat_mask(obj, body)
        image[hat] = HAT
        masks.append(body | hat)
    return image, masks


def chance_consistency() -> float:
    """The chance that two independent, uniformly drawn identities are equal."""
    return 1.0 / len(identities())

