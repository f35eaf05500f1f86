"""The toyworld oracle: what a picture shows, recovered with the world's own palette and shapes.

``read_image`` finds the background (the colour of the picture's border) and every object (a
connected region of pixels far from the background), and reads each object's class (from its
shape), place (from its centre) and identity (body colour, pattern, accessory). ``score_frame``
compares a reading with what the frame's prompt asked for. No learned model: the same tables
that drew the training data (``toyworld.world``) are what the oracle matches against.

Made to be tolerant of what a small diffusion model draws: colours are medians over regions and
matched to the nearest palette entry, shapes are told apart by coarse measures (how much of the
bounding box is filled, how the width changes from top to bottom).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .world import (
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    DARKER,
    HAT,
    HAT_HALF_WIDTH,
    HAT_HEIGHT,
    PLACES,
    SIZE,
    SPOT,
    SPOT_RADIUS,
    Identity,
    scene_of_prompt,
    shape_test,
    spot_centre,
)

# Half the side of the window _shape compares templates in: a template reaches RADIUS + 1 pixels
# from its centre, shifted by at most 1.5 pixels; the rest is margin.
WINDOW = 12

__all__ = ["Found", "FrameScore", "Reading", "components", "read_image", "score_frame"]

FOREGROUND = 48.0  # RGB distance from the background above which a pixel belongs to an object
MIN_AREA = 24  # pixels: smaller regions are noise
BACKGROUND_MATCH = 70.0  # the border colour must be this close to a named background


@dataclass
class Found:
    """One object the oracle sees."""

    cls: str
    place: str
    identity: Identity
    mask: np.ndarray = field(repr=False)
    centre: tuple[float, float] = (0.0, 0.0)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Reading:
    background: str | None
    objects: list[Found]


def _nearest(colour: np.ndarray, table: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(table)
    distances = np.linalg.norm(np.array([table[n] for n in names], np.float32) - colour[None, :], axis=1)
    best = int(np.argmin(distances))
    return names[best], float(distances[best])


def components(mask: np.ndarray, min_area: int = MIN_AREA) -> list[np.ndarray]:
    """The 4-connected regions of ``mask`` with at least ``min_area`` pixels, largest first."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        region = np.zeros_like(mask, dtype=bool)
        queue = deque([(int(y0), int(x0))])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            region[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if region.sum() >= min_area:
            found.append(region)
    return sorted(found, key=lambda r: -int(r.sum()))


def _border(image: np.ndarray, width: int = 2) -> np.ndarray:
    return np.concatenate([image[:width].reshape(-1, 3), image[-width:].reshape(-1, 3),
                           image[:, :width].reshape(-1, 3), image[:, -width:].reshape(-1, 3)])


def _shape(body: np.ndarray) -> str:
    """The class whose shape, centred where the body's bounding box is (give or take two pixels),
    overlaps the body best (intersection over union): the world's own shapes as templates."""
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    # Every template lies within WINDOW pixels of (cx, cy): the intersection is counted in that
    # window, the union is |template| + |body| - intersection, the same IoU as on the whole picture.
    y0, x0 = max(0, int(cy) - WINDOW), max(0, int(cx) - WINDOW)
    window = body[y0:int(cy) + WINDOW + 1, x0:int(cx) + WINDOW + 1]
    y, x = np.mgrid[y0:y0 + window.shape[0], x0:x0 + window.shape[1]].astype(np.float32)
    body_area = float(body.sum())
    best, best_iou = CLASSES[0], -1.0
    for cls in CLASSES:
        for dy in (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5):
            for dx in (-1.0, -0.5, 0.0, 0.5, 1.0):
                template = shape_test(cls, x - (cx + dx) + 0.5, y - (cy + dy) + 0.5)
                inter = float((template & window).sum())
                iou = inter / (float(template.sum()) + body_area - inter)
                if iou > best_iou:
                    best, best_iou = cls, iou
    return best


def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` less its edge pixels (4-neighbourhood)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _split_hat(pixels: np.ndarray, region: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(body, hat) of a region. The hat is the pixels of the region's top rows nearer the hat's
    black than both the background and the body's colour (read a few rows lower, below any hat):
    a blurred hat is grey, not black, but still nearer black than anything else there."""
    rows = np.flatnonzero(region.any(axis=1))
    top = int(rows[0])
    y = np.arange(region.shape[0])[:, None]
    below = region & (y >= top + HAT_HEIGHT + 1) & (y <= top + HAT_HEIGHT + 4)
    not_white = below & (pixels.min(axis=2) < 200)  # a spot there is not the body's colour
    below = not_white if not_white.any() else below
    if not below.any():
        return region, np.zeros_like(region)
    body_value = np.median(pixels[below], axis=0)
    hat_colour = np.array(HAT, np.float32)
    to_hat = np.linalg.norm(pixels - hat_colour, axis=2)
    hat = (region & (y <= top + HAT_HEIGHT) & (to_hat < np.linalg.norm(pixels - body_value, axis=2))
           & (to_hat < np.linalg.norm(pixels - background, axis=2)))
    return region & ~hat, hat


def _identity(pixels: np.ndarray, body: np.ndarray, cls: str, hat: np.ndarray) -> Identity:
    """The identity of one object from its body (hat excluded) and its class.

    Colour: the median of the body's upper half away from the spot and the edge; pattern: the
    lower half's median nearer the darker shade than the colour (halves), or the spot's median
    nearer white-and-colour than the colour (spot); hat: enough hat pixels (``_split_hat``)."""
    size = body.shape[0]
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    top, bottom = int(rows[0]), int(rows[-1])
    cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    y, x = np.mgrid[0:size, 0:size]
    sx, sy = spot_centre(cls, cx, cy)
    from_spot = np.hypot(x - sx + 0.5, y - sy + 0.5)
    inner = _eroded(body)
    inner = inner if inner.sum() >= 8 else body
    middle = (top + bottom + 1) / 2
    ring = inner & (from_spot > SPOT_RADIUS + 1.5)
    upper, lower = ring & (y < middle - 0.5), ring & (y > middle + 0.5)
    upper = upper if upper.sum() >= 3 else inner & (y < middle)
    colour_value = np.median(pixels[upper], axis=0)
    colour, _ = _nearest(colour_value, COLOURS)
    full = np.array(COLOURS[colour], np.float32)
    pattern = "plain"
    if lower.sum() >= 3:
        bottom_value = np.median(pixels[lower], axis=0)
        if np.linalg.norm(bottom_value - full * DARKER) < np.linalg.norm(bottom_value - full):
            pattern = "halves"
    spot = body & (from_spot <= SPOT_RADIUS - 0.5)
    if pattern == "plain" and spot.any():
        spot_value = np.median(pixels[spot], axis=0)
        between = (full + np.array(SPOT, np.float32)) / 2
        if np.linalg.norm(spot_value - between) < np.linalg.norm(spot_value - full):
            pattern = "spot"
    accessory = "hat" if hat.sum() >= HAT_HALF_WIDTH + 1 else "none"
    return Identity(colour, pattern, accessory)


def _with_hats(pixels: np.ndarray, regions: list[np.ndarray]) -> list[np.ndarray]:
    """``regions`` with every hat that blur cut off its object joined back to it: a region nearer
    the hat's black than any body colour, lying just above another region."""
    hat_colour = np.array(HAT, np.float32)
    palette = np.array(list(COLOURS.values()), np.float32)
    hats, bodies = [], []
    for region in regions:
        value = np.median(pixels[region], axis=0)
        is_hat = np.linalg.norm(value - hat_colour) < np.linalg.norm(palette - value[None], axis=1).min()
        (hats if is_hat else bodies).append(region)
    for hat in hats:
        hat_rows, hat_cols = np.flatnonzero(hat.any(axis=1)), np.flatnonzero(hat.any(axis=0))
        for body in bodies:
            rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
            if 0 <= rows[0] - hat_rows[-1] <= 4 and cols[0] <= hat_cols.mean() <= cols[-1]:
                body |= hat
                break
    return bodies


def read_image(image: np.ndarray) -> Reading:
    """The background and every object of ``image`` (``(H, W, 3)`` uint8, toyworld scale)."""
    if image.shape[:2] != (SIZE, SIZE):
        from PIL import Image

        image = np.asarray(Image.fromarray(image).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
    pixels = image.astype(np.float32)
    border = np.median(_border(pixels), axis=0)
    name, distance = _nearest(border, BACKGROUNDS)
    background = name if distance <= BACKGROUND_MATCH else None
    foreground = np.linalg.norm(pixels - border[None, None, :], axis=2) > FOREGROUND
    objects = []
    for region in _with_hats(pixels, components(foreground)):
        body, hat = _split_hat(pixels, region, border)
        if body.sum() < MIN_AREA:
            continue
        cls = _shape(body)
        ys, xs = np.nonzero(body)
        cx = float(xs.mean()) + 0.5
        place = min(PLACES, key=lambda p: abs(PLACES[p] - cx))
        identity = _identity(pixels, body, cls, hat)
        objects.append(Found(cls, place, identity, region, (cx, float(ys.mean()) + 0.5)))
    return Reading(background, objects)


@dataclass
class FrameScore:
    """One frame against its prompt. ``adherent``: the background is the one asked for, and the
    objects are exactly the classes asked for in their places. ``subject``: the identity of the
    object of ``subject_class`` (None when there is no such object)."""

    background: str | None
    wanted_background: str
    adherent: bool
    subject: Identity | None
    reading: Reading = field(repr=False)


def score_frame(image: np.ndarray, prompt: str, subject_class: str | None = None) -> FrameScore:
    """Read ``image`` and compare it with what ``prompt`` asks for. ``subject_class`` is the story's
    subject (default: the prompt's first class)."""
    wanted = scene_of_prompt(prompt)
    reading = read_image(image)
    asked = sorted((o.cls, o.place) for o in wanted.objects)
    seen = sorted((o.cls, o.place) for o in reading.objects)
    adherent = reading.background == wanted.background and seen == asked
    subject_class = subject_class or wanted.objects[0].cls
    if subject_class not in CLASSES:
        raise ValueError(f"unknown subject class {subject_class!r}")
    subjects = [o for o in reading.objects if o.cls == subject_class]
    subject = subjects[0].identity if subjects else None
    return FrameScore(reading.background, wanted.background, adherent, subject, reading)
