"""Labelled contact sheets of a story's frames (``storyboard.png``).

``make_storyboard`` lays out tiles that are already decoded; ``storyboard_sheets`` takes the
frames' PNG bytes as a lazy stream and yields one sheet per ``per_sheet`` frames, holding only
that many thumbnails at a time, so a story of any length fits in a bounded amount of memory.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

__all__ = ["make_storyboard", "png_bytes", "storyboard_sheets"]

_PAD = 8
_LABEL_LINES = 2
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_INSET_BORDER = (255, 255, 255)


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def _text_width(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont
) -> float:
    return draw.textlength(text, font=font)


def _fit(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int
) -> str:
    """Longest prefix of ``text`` that fits in ``width`` pixels, ending in '...' when cut."""
    if _text_width(draw, text, font) <= width:
        return text
    cut = len(text)
    while cut > 0 and _text_width(draw, text[:cut].rstrip() + "...", font) > width:
        cut -= 1
    return text[:cut].rstrip() + "..."


def _wrap(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width: int,
    max_lines: int,
) -> list[str]:
    """Greedy word wrap to ``width`` pixels; what does not fit in ``max_lines`` ends in '...'."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and _text_width(draw, candidate, font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], " ".join(lines[max_lines - 1 :])]
    # _fit also shortens a single word that is wider than the tile.
    return [_fit(draw, line, font, width) for line in lines]


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def make_storyboard(
    tiles: list[tuple[str, Image.Image, Image.Image | None]],
    *,
    columns: int | None = None,
    show_masks: bool = True,
    max_tile_side: int = 512,
) -> Image.Image:
    """Lay frames out in a labelled grid.

    ``tiles`` are ``(label, image, mask or None)`` in reading order. Each label is wrapped to the
    tile width (at most two lines, truncated with '...') under its image. With ``show_masks`` a mask
    is drawn as a small inset in the image's bottom-right corner (white border), where it does not
    change the grid layout. ``columns`` defaults to about the square root of the tile count.
    Images larger than ``max_tile_side`` are shrunk (aspect kept) so that a 500-frame story still
    gives a storyboard of sane size.
    """
    if not tiles:
        raise ValueError("make_storyboard needs at least one tile")
    if columns is None:
        columns = max(1, math.ceil(math.sqrt(len(tiles))))
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)

    images = []
    for _, image, _ in tiles:
        image = _to_rgb(image)
        if max(image.size) > max_tile_side:
            image = image.copy()
            image.thumbnail((max_tile_side, max_tile_side), Image.Resampling.LANCZOS)
        images.append(image)
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)

    font = _font(12 if cell_w >= 128 else 10)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 3)
    line_h = ascent + descent + 2
    labels = [_wrap(probe, label, font, cell_w, _LABEL_LINES) for label, _, _ in tiles]
    label_h = max(1, max(len(lines) for lines in labels)) * line_h + _PAD // 2

    sheet_w = columns * cell_w + (columns + 1) * _PAD
    sheet_h = rows * (cell_h + label_h) + (rows + 1) * _PAD
    sheet = Image.new("RGB", (sheet_w, sheet_h), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    for position, ((_, _, mask), image, lines) in enumerate(zip(tiles, images, labels)):
        row, col = divmod(position, columns)
        x0 = _PAD + col * (cell_w + _PAD)
        y0 = _PAD + row * (cell_h + label_h + _PAD)
        # Centre smaller images in their cell.
        ix = x0 + (cell_w - image.width) // 2
        iy = y0 + (cell_h - image.height) // 2
        sheet.paste(image, (ix, iy))
        if show_masks and mask is not None:
            side = max(16, min(image.width, image.height) // 4)
            inset = mask.convert("L").resize((side, side), Image.Resampling.NEAREST).convert("RGB")
            mx = ix + image.width - side - 3
            my = iy + image.height - side - 3
            draw.rectangle((mx - 2, my - 2, mx + side + 1, my + side + 1), fill=_INSET_BORDER)
            sheet.paste(inset, (mx, my))
        for number, line in enumerate(lines):
            draw.text((x0, y0 + cell_h + 2 + number * line_h), line, fill=_TEXT, font=font)
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    """Encode ``image`` as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(data: bytes, label: str, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as exc:
        raise ValueError(f"storyboard tile {label!r}: the {what} is not a readable image ({exc})") from None
    return image


def _thumbnail(
    label: str, image_png: bytes, mask_png: bytes | None, thumb_side: int, show_masks: bool
) -> tuple[str, Image.Image, Image.Image | None]:
    """Decode one tile and shrink it at once (longest side <= ``thumb_side``, aspect kept)."""
    image = _to_rgb(_decode(image_png, label, "image"))
    image.thumbnail((thumb_side, thumb_side), Image.Resampling.LANCZOS)
    mask = None
    if show_masks and mask_png is not None:
        # The inset is at most a quarter of the thumbnail, so the thumbnail's size is plenty.
        mask = _decode(mask_png, label, "mask").convert("L").resize(image.size, Image.Resampling.NEAREST)
    return label, image, mask


def storyboard_sheets(
    tiles: Iterable[tuple[str, bytes, bytes | None]],
    *,
    per_sheet: int = 48,
    thumb_side: int = 256,
    columns: int | None = None,
    show_masks: bool = True,
) -> Iterator[bytes]:
    """Yield one PNG sheet per ``per_sheet`` tiles, in reading order; the last one may be partial.

    ``tiles`` are ``(label, image PNG bytes, mask PNG bytes or None)`` and are consumed lazily: each
    is decoded and shrunk to a thumbnail (longest side at most ``thumb_side``, aspect kept, never
    enlarged) as soon as it is read, and a sheet is yielded as soon as its ``per_sheet`` tiles are
    in, so at most ``per_sheet`` thumbnails (and one full-size image) are held at any time however
    long the story is. Each sheet is laid out by ``make_storyboard`` (``columns`` and
    ``show_masks`` as there). No tiles, no sheets. A tile that is not a readable image raises a
    one-line ``ValueError`` naming its label.
    """
    if isinstance(per_sheet, bool) or not isinstance(per_sheet, int) or per_sheet < 1:
        raise ValueError(f"per_sheet must be a whole number >= 1, got {per_sheet!r}")
    if isinstance(thumb_side, bool) or not isinstance(thumb_side, int) or thumb_side < 1:
        raise ValueError(f"thumb_side must be a whole number of pixels >= 1, got {thumb_side!r}")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")

    def finish(batch: list[tuple[str, Image.Image, Image.Image | None]]) -> bytes:
        return png_bytes(make_storyboard(batch, columns=columns, show_masks=show_masks, max_tile_side=thumb_side))

    batch: list[tuple[str, Image.Image, Image.Image | None]] = []
    for label, image_png, mask_png in tiles:
        batch.append(_thumbnail(label, image_png, mask_png, thumb_side, show_masks))
        if len(batch) == per_sheet:
            sheet = finish(batch)
            batch = []  # the thumbnails go before the consumer gets the sheet
            yield sheet
    if batch:
        sheet = finish(batch)
        batch = []
        yield sheet
