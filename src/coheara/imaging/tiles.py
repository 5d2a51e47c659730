"""Pathology: one large image, or a region of it, cut into non-overlapping model patches.

MedGemma 1.5 reads a slide as up to about 126 non-overlapping 896x896 patches in spatial
order (DESIGN.md section 1). `tile_image` makes them:

- the grid starts at the region's top-left corner; tiles go row by row, left to right
  (row-major), each `tile` x `tile` source pixels, no overlap;
- a partial tile at the right or bottom edge is padded with white (`PAD_VALUE`, the glass
  of a bright-field slide) to a full tile, so every patch keeps the slide's scale; the
  background rule then judges the padded patch, so a sliver that is mostly padding is
  skipped like any empty patch;
- a patch is background, and skipped, when more than `background` (`BACKGROUND_FRACTION`)
  of its pixels are near white (every channel above `WHITE_LEVEL`), or when every
  channel's standard deviation is below `FLAT_STD` (a uniform patch: blank glass, a
  scanner's fill, a black border);
- at most `max_tiles` patches are kept: when more tissue patches exist, they are sampled
  evenly in spatial order, the first and the last kept, and a warning gives the counts;
- a `tile` other than 896 is resized (bilinear) to the model's 896x896.

The image is decoded whole with Pillow, under `limits.current()` (bytes and
`max_pixels`, checked from the header before decoding). Pyramidal whole-slide formats
(SVS, NDPI, MRXS, ... read through OpenSlide) are not read here: export a level or a
region as TIFF or PNG first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from coheara import model_facts
from coheara.errors import ImageError
from coheara.imaging.image import PreparedImage, Provenance, check_pixels, decode_rgb

TILE_SIZE = model_facts.IMAGE_SIZE
"""Source pixels a patch covers by default: the model's own size, so no resize."""
DEFAULT_MAX_TILES = 126
"""Most patches sent for one slide, as in Google's pathology recipe."""
MIN_TILE = 64
"""Smallest tile accepted: smaller patches would be enlarged more than 14 times."""
WHITE_LEVEL = 220
"""A pixel is near white when every channel is above this (bright-field glass)."""
BACKGROUND_FRACTION = 0.9
"""A patch is background when more than this fraction of its pixels are near white."""
FLAT_STD = 4.0
"""...or when every channel's standard deviation is below this (a uniform patch)."""
PAD_VALUE = 255
"""Partial edge tiles are padded with white, the slide's background."""

Box = tuple[int, int, int, int]
"""(x, y, width, height) in source pixels."""


@dataclass(frozen=True)
class TileProvenance(Provenance):
    """A patch's provenance plus where it sits in the slide (non-identifying: positions)."""

    patch_number: int = 0
    """1-based number among the kept patches: the `PATCH n` label."""
    row: int = 0
    """0-based row of the patch in the region's grid."""
    col: int = 0
    """0-based column of the patch in the region's grid."""
    box: Box = (0, 0, 0, 0)
    """(x, y, width, height) the patch covers in the source image (after EXIF orientation);
    smaller than the tile at a padded right or bottom edge."""
    grid: tuple[int, int] = (0, 0)
    """(rows, columns) of the region's grid."""
    padded: bool = False
    tissue_tiles: int = 0
    """Patches of the grid that were not background (before sampling to max_tiles)."""
    skipped_background: int = 0
    """Patches of the grid skipped as background."""


@dataclass(frozen=True, eq=False)
class TileSet:
    """Tissue patches in spatial (row-major) order, with the grid they come from."""

    tiles: tuple[PreparedImage, ...]
    grid: tuple[int, int]
    """(rows, columns) of the grid over the region."""
    region: Box
    """(x, y, width, height) of the source that was tiled (the whole image by default)."""
    image_size: tuple[int, int]
    """(width, height) of the source image, after EXIF orientation."""
    tile: int
    tissue_tiles: int
    skipped_background: int
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def boxes(self) -> tuple[Box, ...]:
        return tuple(_tile_provenance(t).box for t in self.tiles)

    def summary(self) -> dict[str, Any]:
        """Non-identifying: sizes, counts, positions and warnings."""
        return {
            "kind": "tiles",
            "images": len(self.tiles),
            "image_size": list(self.image_size),
            "region": list(self.region),
            "tile": self.tile,
            "grid": list(self.grid),
            "tissue_tiles": self.tissue_tiles,
            "skipped_background": self.skipped_background,
            "positions": [[p.row, p.col] for p in map(_tile_provenance, self.tiles)],
            "warnings": list(self.warnings),
        }


def is_background(patch: np.ndarray, fraction: float = BACKGROUND_FRACTION) -> bool:
    """Whether an HxWx3 uint8 patch holds no tissue: mostly near white, or uniform."""
    white = float((patch > WHITE_LEVEL).all(axis=-1).mean())
    if white > fraction:
        return True
    spread = patch.reshape(-1, patch.shape[-1]).std(axis=0, dtype=np.float32)
    return bool((spread < FLAT_STD).all())


def tile_image(
    source: str | Path | bytes | np.ndarray | Image.Image,
    *,
    region: Box | None = None,
    tile: int = TILE_SIZE,
    max_tiles: int = DEFAULT_MAX_TILES,
    background: float | None = BACKGROUND_FRACTION,
    label: str = "slide",
) -> TileSet:
    """Cut a large picture (or `region` = (x, y, width, height) of it) into tissue patches.

    source: a path, bytes, base64, an HxWx3 array or a PIL image (first page of a TIFF).
    background: the near-white fraction above which a patch is skipped (see the module
    docstring); None keeps every patch. Refuses a region outside the image, a slide with
    no tissue, and an image over the limits, with one-line `ImageError`s.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < MIN_TILE:
        raise ImageError(f"tile must be a whole number of pixels, at least {MIN_TILE}")
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1:
        raise ImageError("max_tiles must be at least 1")
    if background is not None and not 0.0 < background <= 1.0:
        raise ImageError("background must be a fraction above 0 and at most 1, or None")
    image, decoded = decode_rgb(source, label=label)
    check_pixels(image.width, image.height)
    x0, y0, width, height = _region(region, image.width, image.height)
    rows, cols = -(-height // tile), -(-width // tile)

    tissue: list[tuple[int, int, Box]] = []
    for row in range(rows):  # first pass: judge every patch, keep only where tissue is
        for col in range(cols):
            box = (
                x0 + col * tile,
                y0 + row * tile,
                min(tile, width - col * tile),
                min(tile, height - row * tile),
            )
            if background is None or not is_background(_patch(image, box, tile), background):
                tissue.append((row, col, box))
    skipped = rows * cols - len(tissue)
    if not tissue:
        raise ImageError(
            f"no tissue found: all {skipped} tiles are background",
            hint="choose another region, or pass background=None to keep every tile",
        )
    notes = list(decoded.warnings)
    if len(tissue) > max_tiles:
        notes.append(
            f"{max_tiles} of {len(tissue)} tissue tiles kept, sampled evenly in spatial order"
        )
        tissue = [tissue[i] for i in _sample_evenly(len(tissue), max_tiles)]
    if tile != TILE_SIZE:
        notes.append(f"tiles of {tile} pixels resized to {TILE_SIZE}")

    base = decoded.to_dict()
    base.update(kind="tile", recipe="tile" if tile == TILE_SIZE else "tile_resize")
    tiles = []
    for number, (row, col, box) in enumerate(tissue, start=1):
        padded = box[2] < tile or box[3] < tile
        own = [f"edge tile padded with white from {box[2]}x{box[3]}"] if padded else []
        provenance = TileProvenance(
            **{**base, "warnings": (*notes, *own)},
            patch_number=number,
            row=row,
            col=col,
            box=box,
            grid=(rows, cols),
            padded=padded,
            tissue_tiles=rows * cols - skipped,
            skipped_background=skipped,
        )
        pixels = _patch(image, box, tile)
        if tile != TILE_SIZE:
            pixels = np.asarray(
                Image.fromarray(pixels, mode="RGB").resize(
                    (TILE_SIZE, TILE_SIZE), Image.Resampling.BILINEAR
                ),
                dtype=np.uint8,
            ).copy()
        tiles.append(PreparedImage(pixels, source=label, provenance=provenance))
    return TileSet(
        tiles=tuple(tiles),
        grid=(rows, cols),
        region=(x0, y0, width, height),
        image_size=(image.width, image.height),
        tile=tile,
        tissue_tiles=rows * cols - skipped,
        skipped_background=skipped,
        warnings=tuple(notes),
    )


DEFAULT_INSTRUCTION = (
    "You are reviewing {count} non-overlapping patches of one pathology slide, in spatial "
    "order (left to right, top to bottom), each labelled PATCH n with its row and column "
    "in the slide. Please review the patches provided below carefully."
)


def tile_parts(
    instruction: str, tiles: Sequence[PreparedImage], question: str
) -> list[str | PreparedImage]:
    """The instruction, each patch followed by `PATCH n (row r, column c)` (1-based; just
    `PATCH n` for an image without a grid position), the question last."""
    parts: list[str | PreparedImage] = [instruction]
    for number, image in enumerate(tiles, start=1):
        parts.append(image)
        where = image.provenance
        if isinstance(where, TileProvenance):
            parts.append(f"PATCH {number} (row {where.row + 1}, column {where.col + 1})")
        else:
            parts.append(f"PATCH {number}")
    parts.append(question)
    return parts


def tile_messages(
    question: str,
    tiles: TileSet | Sequence[PreparedImage],
    *,
    instruction: str | None = None,
) -> list[Any]:
    """The engine's `messages=` for a slide's patches, in the order `volume_messages` uses
    for slices: the instruction first, each patch then its label, the question last (one
    user turn of ordered parts)."""
    from coheara.engine.chat_format import InputMessage

    images = tuple(tiles.tiles if isinstance(tiles, TileSet) else tiles)
    if not images:
        raise ImageError("there are no tiles to send")
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION.format(count=len(images))
    return [InputMessage.from_parts("user", tile_parts(instruction, images, question))]


def _region(region: Box | None, width: int, height: int) -> Box:
    if region is None:
        return (0, 0, width, height)
    if len(region) != 4 or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in region
    ):
        raise ImageError("region must be four whole numbers: x, y, width, height")
    x, y, w, h = (int(v) for v in region)
    if w < 1 or h < 1:
        raise ImageError("region width and height must be at least 1 pixel")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise ImageError(
            f"region ({x}, {y}, {w}, {h}) does not lie inside the {width}x{height} image"
        )
    return (x, y, w, h)


def _patch(image: Image.Image, box: Box, tile: int) -> np.ndarray:
    """The source pixels under `box` as tile x tile x 3 uint8, padded white at an edge."""
    x, y, w, h = box
    pixels = np.asarray(image.crop((x, y, x + w, y + h)), dtype=np.uint8)
    if (h, w) == (tile, tile):
        return pixels.copy()
    out = np.full((tile, tile, 3), PAD_VALUE, dtype=np.uint8)
    out[:h, :w] = pixels
    return out


def _sample_evenly(count: int, most: int) -> list[int]:
    """`most` indices of `count`, evenly spread, the first and the last included."""
    if count <= most:
        return list(range(count))
    if most == 1:
        return [0]
    return [int(i) for i in np.round(np.linspace(0, count - 1, most)).astype(int)]


def _tile_provenance(image: PreparedImage) -> TileProvenance:
    if not isinstance(image.provenance, TileProvenance):
        raise ImageError("a tile set holds only tiles")
    return image.provenance
