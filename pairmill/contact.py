"""Contact sheets: pairs of thumbnails in a grid, captioned, rows optionally labelled.

Shared by ``pairmill hist --examples`` (one row per similarity bin) and ``pairmill
inspect --png`` (a grid of kept pairs). The geometry lives in `Layout` so tests
and callers can find each cell's pixels; drawing uses Pillow's bundled font only,
so the same pairs always give the same PNG, offline.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw, ImageFont, ImageOps

BACKGROUND = (255, 255, 255)
LETTERBOX = (228, 228, 228)  # the unused part of a thumbnail cell
MISSING = (200, 60, 60)  # the cross drawn when an image cannot be shown
INK = (20, 20, 20)
FONT_SIZE = 11
LINE_HEIGHT = 14


@dataclass(frozen=True)
class PairCell:
    """One pair to draw.

    Args:
      cond: encoded bytes of the conditioning image, or None when unavailable.
      target: encoded bytes of the target image, or None.
      caption: text under the pair; ``\\n`` separates lines.
    """

    cond: bytes | None
    target: bytes | None
    caption: str


@dataclass(frozen=True)
class Layout:
    """Where everything goes on a sheet (all sizes in pixels).

    Args:
      rows: number of rows of pairs.
      columns: pairs per row.
      thumb: side of the square each thumbnail is fitted into.
      label_width: width of the row-label column (0: no labels).
      caption_lines: text lines under each pair.
      title_height: height of the title strip (0: no title).
      gap: space around cells.
      pair_gap: space between the two images of a pair (narrower, so pairs read as units).
    """

    rows: int
    columns: int
    thumb: int = 128
    label_width: int = 0
    caption_lines: int = 1
    title_height: int = 0
    gap: int = 14
    pair_gap: int = 3

    @property
    def cell_width(self) -> int:
        return 2 * self.thumb + self.pair_gap

    @property
    def caption_height(self) -> int:
        return self.caption_lines * LINE_HEIGHT + 4

    @property
    def cell_height(self) -> int:
        return self.thumb + self.caption_height

    @property
    def size(self) -> tuple[int, int]:
        width = self.gap + self.label_width + self.columns * (self.cell_width + self.gap)
        height = self.title_height + self.gap + self.rows * (self.cell_height + self.gap)
        return width, height

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        x = self.gap + self.label_width + column * (self.cell_width + self.gap)
        y = self.title_height + self.gap + row * (self.cell_height + self.gap)
        return x, y

    def image_box(self, row: int, column: int, side: int) -> tuple[int, int, int, int]:
        """The thumbnail square of one side (0 = cond, 1 = target): (x0, y0, x1, y1)."""
        x, y = self.cell_origin(row, column)
        x += side * (self.thumb + self.pair_gap)
        return x, y, x + self.thumb, y + self.thumb

    def caption_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        x, y = self.cell_origin(row, column)
        return x, y + self.thumb, x + self.cell_width, y + self.cell_height

    def label_box(self, row: int) -> tuple[int, int, int, int]:
        _, y = self.cell_origin(row, 0)
        return self.gap, y, self.gap + self.label_width, y + self.cell_height


@cache
def font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (scalable when Pillow has FreeType; bitmap otherwise)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def thumbnail(data: bytes | None, side: int) -> Image.Image:
    """The image fitted into a side x side square (aspect kept, letterboxed, EXIF applied)."""
    cell = Image.new("RGB", (side, side), LETTERBOX)
    image = _decode(data, side)
    if image is None:
        _draw_missing(cell)
        return cell
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    cell.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return cell


def _decode(data: bytes | None, side: int) -> Image.Image | None:
    if not data:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        # JPEG draft decoding at a reduced scale: thumbnails never need full resolution.
        image.draft("RGB", (side, side))
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _draw_missing(cell: Image.Image) -> None:
    draw = ImageDraw.Draw(cell)
    draw.line((0, 0, cell.width, cell.height), fill=MISSING, width=3)
    draw.line((0, cell.height, cell.width, 0), fill=MISSING, width=3)


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """The text, shortened with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font()) <= width:
        return text
    while text and draw.textlength(text + "…", font=font()) > width:
        text = text[:-1]
    return text + "…"


def _write_lines(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str) -> None:
    x0, y0, x1, y1 = box
    for i, line in enumerate(text.split("\n")):
        y = y0 + 2 + i * LINE_HEIGHT
        if y + LINE_HEIGHT > y1 + 2:
            break
        draw.text((x0 + 2, y), fit_text(draw, line, x1 - x0 - 4), fill=INK, font=font())


def pair_sheet(
    rows: Sequence[tuple[str, Sequence[PairCell]]],
    *,
    columns: int | None = None,
    thumb: int = 128,
    label_width: int = 150,
    title: str = "",
) -> Image.Image:
    """Draw labelled rows of pairs (cond | target side by side, caption under each pair).

    Args:
      rows: (label, pairs) per row; labels may be empty (then no label column is drawn).
      columns: pairs per row (default: the longest row).
      thumb: thumbnail side in pixels.
      label_width: width of the label column when any label is set.
      title: a line across the top (omitted when empty).
    """
    layout = sheet_layout(rows, columns=columns, thumb=thumb, label_width=label_width, title=title)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        _write_lines(draw, (layout.gap, 2, layout.size[0] - layout.gap, layout.title_height), title)
    for r, (label, cells) in enumerate(rows):
        if layout.label_width:
            _write_lines(draw, layout.label_box(r), label)
        for c, cell in enumerate(cells[: layout.columns]):
            for side, data in enumerate((cell.cond, cell.target)):
                sheet.paste(thumbnail(data, layout.thumb), layout.image_box(r, c, side)[:2])
            _write_lines(draw, layout.caption_box(r, c), cell.caption)
    return sheet


def sheet_layout(
    rows: Sequence[tuple[str, Sequence[PairCell]]],
    *,
    columns: int | None = None,
    thumb: int = 128,
    label_width: int = 150,
    title: str = "",
) -> Layout:
    """The layout `pair_sheet` uses for these rows and options."""
    widest = max((len(cells) for _, cells in rows), default=0)
    lines = max((cell.caption.count("\n") + 1 for _, cells in rows for cell in cells), default=1)
    return Layout(
        rows=len(rows),
        columns=max(1, columns or widest),
        thumb=thumb,
        label_width=label_width if any(label for label, _ in rows) else 0,
        caption_lines=lines,
        title_height=LINE_HEIGHT + 6 if title else 0,
    )


def grid(cells: Sequence[PairCell], columns: int) -> list[tuple[str, list[PairCell]]]:
    """Unlabelled rows of `columns` pairs each, in order."""
    return [("", list(cells[i : i + columns])) for i in range(0, len(cells), columns)]


def save_png(image: Image.Image, path) -> None:
    """Write a PNG (no timestamp chunks, so equal sheets give equal files)."""
    image.save(path, format="PNG", optimize=False)
