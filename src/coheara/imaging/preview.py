"""Draw what the model will see, so a person can check it by eye (`coheara image inspect`).

Pure functions from prepared images to one PIL image; nothing is read or written here.

- A volume becomes a contact sheet: every prepared slice as a thumbnail, in the order the
  model gets them, each captioned with the `SLICE n` label the model reads after it.
- One CT image with the three-window recipe becomes its composite RGB beside its three
  windows as greyscale, so each channel can be checked on its own.
- Anything else (a picture, other DICOM, several pictures, kinds added later) becomes the
  same grid, captioned `image n`.

Thumbnails are box-filtered (an area average: no value appears that the image did not
hold) and captions go in a strip under each image, never on its pixels. The only text
drawn is what Coheara writes: labels and windows, never anything read from a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from coheara import model_facts
from coheara.errors import ImageError
from coheara.imaging.image import PreparedImage
from coheara.imaging.prepare import Prepared

THUMB = 224
"""Default side of a thumbnail on a sheet of several images, in pixels."""

MIN_THUMB = 16
MAX_THUMB = model_facts.IMAGE_SIZE
"""No thumbnail is larger than what the model sees: upscaling would show nothing more."""

GAP = 8
"""Pixels of background around and between the cells."""

MAX_SHEET_PIXELS = 200_000_000
"""Largest sheet drawn (about 600 MB as RGB): refused before anything is allocated."""

BACKGROUND = (28, 32, 40)
TEXT = (240, 240, 240)

_CHANNELS = ("R", "G", "B")


@dataclass(frozen=True)
class Layout:
    """Where each cell sits: a thumbnail with its caption strip underneath."""

    count: int
    thumb: int
    columns: int
    rows: int
    label_height: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the sheet in pixels."""
        width = self.columns * self.thumb + (self.columns + 1) * GAP
        height = self.rows * (self.thumb + self.label_height) + (self.rows + 1) * GAP
        return width, height

    def box(self, index: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of image `index`'s thumbnail, row by row."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        row, column = divmod(index, self.columns)
        left = GAP + column * (self.thumb + GAP)
        top = GAP + row * (self.thumb + self.label_height + GAP)
        return left, top, left + self.thumb, top + self.thumb

    def label_box(self, index: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the caption strip under image `index`."""
        left, _, right, bottom = self.box(index)
        return left, bottom, right, bottom + self.label_height


def font_size(thumb: int) -> int:
    """Captions grow with the thumbnail, within what stays legible and modest."""
    return max(10, min(32, thumb // 14))


def label_height(thumb: int) -> int:
    size = font_size(thumb)
    return size + 2 * _pad(size)


def _pad(size: int) -> int:
    return max(3, size // 3)


def layout(count: int, thumb: int = THUMB, columns: int | None = None) -> Layout:
    """A near-square grid for `count` cells (or `columns` wide), checked against the limits."""
    if count < 1:
        raise ImageError("nothing to draw: no image")
    if not MIN_THUMB <= thumb <= MAX_THUMB:
        raise ImageError(f"thumbnail size must be from {MIN_THUMB} to {MAX_THUMB} pixels")
    if columns is not None and columns < 1:
        raise ImageError("columns must be at least 1")
    wide = min(columns or math.ceil(math.sqrt(count)), count)
    result = Layout(count, thumb, wide, math.ceil(count / wide), label_height(thumb))
    width, height = result.size
    if width * height > MAX_SHEET_PIXELS:
        raise ImageError(
            f"the sheet would hold more than {MAX_SHEET_PIXELS} pixels",
            hint="lower --thumb or --max-slices",
        )
    return result


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own default font: nothing to download; a fixed bitmap without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError, ValueError):
        return ImageFont.load_default()


def _caption(text: str, width: int, height: int, size: int) -> Image.Image:
    """A strip holding `text`, centred, shrunk (then cut) until it fits: never past its cell."""
    strip = Image.new("RGB", (width, height), BACKGROUND)
    room = width - 2
    font = _font(size)
    while size > 6 and font.getlength(text) > room:
        size -= 1
        font = _font(size)
    while len(text) > 1 and font.getlength(text) > room:
        text = text[:-2] + "…"
    left = max(1, int((width - font.getlength(text)) / 2))
    ImageDraw.Draw(strip).text((left, max(0, (height - size) // 2)), text, fill=TEXT, font=font)
    return strip


def thumbnail(image: PreparedImage | Image.Image, thumb: int) -> Image.Image:
    """The image at `thumb` x `thumb`: untouched at the model's size, else an area average."""
    picture = image.to_pil() if isinstance(image, PreparedImage) else image.convert("RGB")
    if picture.size == (thumb, thumb):
        return picture
    return picture.resize((thumb, thumb), Image.Resampling.BOX)


def grid(
    pictures: Sequence[PreparedImage | Image.Image],
    labels: Sequence[str],
    *,
    thumb: int = THUMB,
    columns: int | None = None,
) -> Image.Image:
    """Pictures in a grid, row by row, each with its caption underneath."""
    if len(labels) != len(pictures):
        raise ImageError("one label is needed for each image")
    cells = layout(len(pictures), thumb, columns)
    sheet = Image.new("RGB", cells.size, BACKGROUND)
    size = font_size(thumb)
    for index, (picture, label) in enumerate(zip(pictures, labels, strict=True)):
        left, top, _, bottom = cells.box(index)
        sheet.paste(thumbnail(picture, thumb), (left, top))
        sheet.paste(_caption(label, thumb, cells.label_height, size), (left, bottom))
    return sheet


def contact_sheet(
    prepared: Prepared, *, thumb: int = THUMB, columns: int | None = None
) -> Image.Image:
    """Every prepared image in the order the model gets them, each with its label."""
    return grid(prepared.images, prepared.labels(), thumb=thumb, columns=columns)


def channel_captions(image: PreparedImage) -> list[str]:
    """Captions of the three channels: their HU windows when the recipe says which."""
    provenance = image.provenance
    window: Any = provenance.window if provenance else None
    try:
        pairs = [(float(lo), float(hi)) for lo, hi in window]
        if len(pairs) == 3 and provenance is not None and provenance.recipe == "ct_windows":
            return [
                f"{name} {lo:g}..{hi:g} HU" for name, (lo, hi) in zip(_CHANNELS, pairs, strict=True)
            ]
    except (TypeError, ValueError):
        pass
    return [f"{name} channel" for name in _CHANNELS]


def ct_channels(image: PreparedImage, *, panel: int = MAX_THUMB) -> Image.Image:
    """The composite RGB, then its red, green and blue channels each as greyscale."""
    composite = thumbnail(image, panel)
    greys = [Image.merge("RGB", (channel,) * 3) for channel in composite.split()]
    return grid(
        [composite, *greys], ["composite RGB", *channel_captions(image)], thumb=panel, columns=4
    )


def is_single_ct(prepared: Prepared) -> bool:
    """One CT image (not a volume's slice) under the default three-window recipe."""
    if prepared.kind == "volume" or len(prepared.images) != 1:
        return False
    provenance = prepared.images[0].provenance
    return provenance is not None and provenance.recipe == "ct_windows"


@dataclass(frozen=True)
class Preview:
    """The drawn sheet and how it was laid out (non-identifying, for the summary)."""

    image: Image.Image
    layout: str
    """"ct_channels", "contact_sheet" (a volume) or "grid"."""
    cells: Layout

    def summary(self) -> dict[str, Any]:
        width, height = self.image.size
        return {
            "layout": self.layout,
            "columns": self.cells.columns,
            "rows": self.cells.rows,
            "thumb": self.cells.thumb,
            "width": width,
            "height": height,
        }


def render(prepared: Prepared, *, thumb: int | None = None, columns: int | None = None) -> Preview:
    """The right drawing for what `prepare` returned; one image shows at the model's size
    unless `thumb` says otherwise, several at `THUMB`."""
    if not prepared.images:
        raise ImageError("nothing to draw: no image")
    if thumb is None:
        thumb = MAX_THUMB if len(prepared.images) == 1 else THUMB
    if is_single_ct(prepared):
        return Preview(
            ct_channels(prepared.images[0], panel=thumb), "ct_channels", layout(4, thumb, 4)
        )
    name = "contact_sheet" if prepared.kind == "volume" else "grid"
    cells = layout(len(prepared.images), thumb, columns)
    return Preview(contact_sheet(prepared, thumb=thumb, columns=columns), name, cells)
