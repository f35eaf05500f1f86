"""``storyboard_sheets``: one sheet per N frames, lazily, with a bounded number of thumbnails held."""

from __future__ import annotations

import gc
import io
import math
import weakref
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from storysync_dist.io.storyboard import make_storyboard, png_bytes, storyboard_sheets

PAD = 8  # the storyboard's margin between and around cells


def tile_png(number: int, size: tuple[int, int] = (128, 96)) -> bytes:
    image = Image.new("RGB", size, ((number * 37) % 256, (number * 91) % 256, (number * 53) % 256))
    return png_bytes(image)


def mask_png(size: tuple[int, int] = (128, 96)) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return png_bytes(mask)


def tiles(count: int, size: tuple[int, int] = (128, 96)) -> Iterator[tuple[str, bytes, bytes | None]]:
    mask = mask_png(size)
    for number in range(count):
        yield f"s{number:03d}: a fox", tile_png(number, size), mask if number % 2 else None


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_100_tiles_make_three_sheets_on_the_grid() -> None:
    sheets = [decode(s) for s in storyboard_sheets(tiles(100), per_sheet=48, thumb_side=64)]
    assert len(sheets) == 3
    # 128x96 shrinks to 64x48 cells. 48 tiles: ceil(sqrt(48)) = 7 columns, 7 rows; 4 tiles: 2 x 2.
    cell_w, cell_h = 64, 48
    for sheet, (cols, rows) in zip(sheets, [(7, 7), (7, 7), (2, 2)], strict=True):
        assert sheet.width == cols * cell_w + (cols + 1) * PAD
        assert (sheet.height - (rows + 1) * PAD) % rows == 0
    row_heights = [(sheet.height - (rows + 1) * PAD) // rows for sheet, rows in zip(sheets, [7, 7, 2])]
    # Every row is one cell plus the same one-line label band.
    assert len(set(row_heights)) == 1 and row_heights[0] > cell_h

    wide = [decode(s) for s in storyboard_sheets(tiles(100), per_sheet=48, thumb_side=64, columns=10)]
    assert [(s.width, s.height) for s in wide][:2] == [(10 * 64 + 11 * PAD, 5 * row_heights[0] + 6 * PAD)] * 2
    assert (wide[2].width, wide[2].height) == (4 * 64 + 5 * PAD, row_heights[0] + 2 * PAD)


def test_a_sheet_is_make_storyboard_of_its_thumbnails() -> None:
    data = list(tiles(5))
    [sheet] = storyboard_sheets(data, per_sheet=8, thumb_side=64)
    reference_tiles = []
    for label, image_png, mask in data:
        image = Image.open(io.BytesIO(image_png)).convert("RGB")
        image.thumbnail((64, 64), Image.Resampling.LANCZOS)
        reference_tiles.append((label, image, Image.open(io.BytesIO(mask)) if mask else None))
    reference = make_storyboard(reference_tiles)
    assert np.array_equal(np.asarray(decode(sheet).convert("RGB")), np.asarray(reference))
    # The mask inset of tile 1 is drawn: the sheet differs from one without masks.
    [plain] = storyboard_sheets(data, per_sheet=8, thumb_side=64, show_masks=False)
    assert not np.array_equal(np.asarray(decode(plain)), np.asarray(decode(sheet)))


@pytest.mark.parametrize(
    ("size", "thumb"),
    [((1000, 300), (100, 30)), ((300, 1000), (30, 100)), ((50, 40), (50, 40)), ((100, 100), (100, 100))],
)
def test_a_thumbnail_is_at_most_thumb_side(size: tuple[int, int], thumb: tuple[int, int]) -> None:
    [sheet] = storyboard_sheets(
        [("one", tile_png(3, size), None)], per_sheet=4, thumb_side=100, columns=1
    )
    image = decode(sheet).convert("RGB")
    # One cell: the thumbnail's size plus the margins; smaller pictures are not enlarged.
    assert image.width == thumb[0] + 2 * PAD
    pixels = np.asarray(image)
    colour = np.asarray(Image.new("RGB", (1, 1), (111, 17, 159)))[0, 0]
    painted = np.argwhere((pixels == colour).all(axis=-1))
    (top, left), (bottom, right) = painted.min(axis=0), painted.max(axis=0)
    assert (right - left + 1, bottom - top + 1) == thumb


def test_no_tiles_no_sheets_and_bad_arguments() -> None:
    assert list(storyboard_sheets([])) == []
    assert list(storyboard_sheets(iter([]), per_sheet=1)) == []
    for kwargs in ({"per_sheet": 0}, {"thumb_side": 0}, {"columns": 0}, {"per_sheet": True}):
        with pytest.raises(ValueError):
            list(storyboard_sheets(tiles(1), **kwargs))


def test_a_bad_tile_names_its_label() -> None:
    with pytest.raises(ValueError, match=r"^storyboard tile 'frame-7': the image is not a readable image"):
        list(storyboard_sheets([("frame-7", b"not a png", None)]))


def test_sheets_come_as_soon_as_their_tiles_are_read() -> None:
    consumed = 0

    def counting(count: int) -> Iterator[tuple[str, bytes, bytes | None]]:
        nonlocal consumed
        for tile in tiles(count):
            consumed += 1
            yield tile

    sheets = storyboard_sheets(counting(100), per_sheet=48, thumb_side=32)
    assert consumed == 0  # nothing happens before the first sheet is asked for
    seen = []
    for sheet in sheets:
        seen.append(consumed)
        assert decode(sheet).width > 0
    assert seen == [48, 96, 100]


@pytest.fixture
def live_images(monkeypatch: pytest.MonkeyPatch):
    """A counter of the PIL images alive now: every image made while the test runs is registered by a
    weak reference as it is built (scanning ``gc.get_objects()`` instead takes seconds a call in a
    process that holds torch and diffusers)."""
    made: list[weakref.ref] = []  # PIL images define __eq__, so a WeakSet cannot hold them
    init = Image.Image.__init__

    def tracked_init(self: Image.Image, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(Image.Image, "__init__", tracked_init)

    def count() -> int:
        gc.collect()  # an image kept only by a reference cycle is not held
        return sum(ref() is not None for ref in made)

    # Everything alive before the test (torch, diffusers, ...) goes to the permanent generation,
    # which gc.collect() does not walk: a collection then costs what the test made, not seconds.
    gc.freeze()
    try:
        yield count
    finally:
        gc.unfreeze()


def test_held_thumbnails_never_exceed_per_sheet(live_images) -> None:
    # Count the PIL images alive each time a tile is read and each time a sheet comes out: a version
    # that decodes the whole story first, or keeps earlier sheets' thumbnails, holds up to 40.
    per_sheet, count = 6, 40
    baseline = live_images()
    peaks: list[int] = []

    def watched() -> Iterator[tuple[str, bytes, bytes | None]]:
        for tile in tiles(count, size=(64, 64)):
            peaks.append(live_images() - baseline)
            yield tile

    sheets = 0
    for _sheet in storyboard_sheets(watched(), per_sheet=per_sheet, thumb_side=16):
        sheets += 1
        peaks.append(live_images() - baseline)
    assert sheets == math.ceil(count / per_sheet)
    assert len(peaks) == count + sheets
    # At most one sheet's thumbnails (with their masks) plus the tile being decoded.
    assert max(peaks) <= 2 * per_sheet + 2, peaks
    assert max(peaks) >= per_sheet - 1  # the thumbnails of a sheet were really counted


def test_storyboard_layout() -> None:
    tiles = [
        (
            f"#{i} frame-{i:04d} " + "a very long label that must be wrapped and cut " * 3,
            Image.new("RGB", (64, 64)),
            None,
        )
        for i in range(5)
    ]
    board = make_storyboard(tiles)
    # Five tiles -> three columns, two rows; labels add height below each row.
    assert board.width == 3 * 64 + 4 * 8
    assert board.height > 2 * 64
    assert make_storyboard(tiles, columns=5).width == 5 * 64 + 6 * 8
    big = make_storyboard([("big", Image.new("RGB", (2048, 1024)), None)], max_tile_side=256)
    assert big.width == 256 + 2 * 8
