"""Pictures (photographs, TIFF pages, every colour mode) and pathology tiling, by value.

Every input is made here with Pillow or numpy; 896x896 sources are used where exact pixel
values matter, since they reach the model without a resize.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from coheara.errors import ImageError
from coheara.imaging import limits
from coheara.imaging.image import Provenance, load_image, load_pages
from coheara.imaging.tiles import (
    BACKGROUND_FRACTION,
    FLAT_STD,
    WHITE_LEVEL,
    TileProvenance,
    TileSet,
    is_background,
    tile_image,
    tile_messages,
)

SIDE = 896
RED, BLUE, BLACK = (255, 0, 0), (0, 0, 255), (0, 0, 0)


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def prov(image: Any) -> Provenance:
    assert image.provenance is not None
    return image.provenance


def near(pixel: Any, colour: tuple[int, int, int], tolerance: int = 12) -> bool:
    return bool(np.abs(np.asarray(pixel, dtype=int) - colour).max() <= tolerance)


# ------------------------------------------------------------------ EXIF orientation


def corners_jpeg(exif: bytes | None = None) -> bytes:
    """60 wide, 40 tall, black; as stored: red top-left corner, blue top-right corner."""
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:16, :16] = RED
    pixels[:16, -16:] = BLUE
    options: dict[str, Any] = {"quality": 95}
    if exif is not None:
        options["exif"] = exif
    return encode(Image.fromarray(pixels), "JPEG", **options)


def orientation_exif(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def corner(pixels: np.ndarray, where: str) -> np.ndarray:
    """A pixel well inside one corner of the 896 square."""
    y = 40 if where[0] == "t" else SIDE - 40
    x = 40 if where[1] == "l" else SIDE - 40
    return pixels[y, x]


def test_upright_photograph_keeps_its_colours_and_corners() -> None:
    image = load_image(corners_jpeg())
    assert near(corner(image.pixels, "tl"), RED) and near(corner(image.pixels, "tr"), BLUE)
    assert near(corner(image.pixels, "bl"), BLACK) and near(corner(image.pixels, "br"), BLACK)
    p = prov(image)
    assert (p.kind, p.recipe, p.source_format, p.source_mode) == (
        "picture",
        "square_resize",
        "JPEG",
        "RGB",
    )
    assert p.orientation is None and p.warnings == ()


@pytest.mark.parametrize(
    ("orientation", "red_at", "blue_at", "black_at"),
    [
        (6, "tr", "br", "tl"),  # turned 90 degrees clockwise to be upright
        (8, "bl", "tl", "br"),  # turned 90 degrees counter-clockwise
        (3, "br", "bl", "tl"),  # turned 180 degrees
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, red_at: str, blue_at: str, black_at: str
) -> None:
    image = load_image(corners_jpeg(orientation_exif(orientation)))
    assert near(corner(image.pixels, red_at), RED)
    assert near(corner(image.pixels, blue_at), BLUE)
    assert near(corner(image.pixels, black_at), BLACK)
    p = prov(image)
    assert p.orientation == orientation
    assert any(w.startswith(f"EXIF orientation {orientation} applied") for w in p.warnings)


def test_exif_orientation_changes_the_shape_before_the_square_resize() -> None:
    # 60x40 stored, 40x60 upright: the red block (16 of 40 columns after turning) must
    # span 16/40 of the square's width, not 16/60 of it.
    image = load_image(corners_jpeg(orientation_exif(6)))
    row = image.pixels[40, :, 0].astype(int)
    red_columns = int((row > 128).sum())
    assert abs(red_columns - SIDE * 16 / 40) < 20


def test_damaged_exif_orientation_tag_is_ignored_with_a_warning() -> None:
    # An IFD with one orientation entry whose count points far past the block's end.
    broken = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\xff\xff\xff\x00"
    broken += b"\x50\x00\x00\x00\x00\x00\x00\x00"
    image = load_image(corners_jpeg(broken))
    assert near(corner(image.pixels, "tl"), RED)  # used as stored
    p = prov(image)
    assert p.orientation is None
    assert "EXIF block is partly damaged" in p.warnings


@pytest.mark.parametrize("where", [Image.Exif, Image.Image])
def test_unreadable_exif_falls_back_to_the_stored_image(
    monkeypatch: pytest.MonkeyPatch, where: type
) -> None:
    # Reading the orientation fails (Exif.load), or applying it does (getexif).
    def explode(*args: Any) -> Any:
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(where, "load" if where is Image.Exif else "getexif", explode)
    image = load_image(corners_jpeg(orientation_exif(6)))
    assert near(corner(image.pixels, "tl"), RED) and near(corner(image.pixels, "tr"), BLUE)
    p = prov(image)
    assert p.orientation is None
    assert any(w.startswith("EXIF block is damaged") for w in p.warnings)


def test_invalid_orientation_value_is_not_applied() -> None:
    image = load_image(corners_jpeg(orientation_exif(9)))
    assert near(corner(image.pixels, "tl"), RED)
    assert "EXIF orientation value is invalid; image used as stored" in prov(image).warnings


# ------------------------------------------------------------------ TIFF pages, bit depth


def ramp16(width: int = 64, height: int = 64, lo: int = 0, hi: int = 4095) -> Image.Image:
    """A left-to-right 16-bit ramp."""
    row = np.linspace(lo, hi, width).round().astype(np.uint16)
    return Image.fromarray(np.tile(row, (height, 1)))


def three_page_tiff() -> bytes:
    first = Image.new("RGB", (40, 30), (200, 10, 10))
    third = Image.new("L", (20, 20), 77)
    return encode(first, "TIFF", save_all=True, append_images=[ramp16(), third])


def assert_left_to_right_ramp(pixels: np.ndarray) -> None:
    assert pixels.min() == 0 and pixels.max() == 255
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    steps = np.diff(pixels[..., 0].astype(int), axis=1)
    assert (steps >= 0).all()  # monotone along every row
    assert (pixels[:, 0, 0] == 0).all() and (pixels[:, -1, 0] == 255).all()


def test_every_tiff_page_is_read_with_its_own_values() -> None:
    pages = load_pages(three_page_tiff())
    assert len(pages) == 3
    assert (pages[0].pixels == (200, 10, 10)).all()
    assert_left_to_right_ramp(pages[1].pixels)
    assert (pages[2].pixels == 77).all()
    provenances = [prov(page) for page in pages]
    assert [p.frame_index for p in provenances] == [0, 1, 2]
    assert all(p.frames == 3 and p.source_format == "TIFF" for p in provenances)
    assert [p.source_mode for p in provenances] == ["RGB", "I;16", "L"]
    assert [p.recipe for p in provenances] == ["square_resize", "min_max", "square_resize"]
    assert provenances[1].window == (0.0, 4095.0)
    assert provenances[1].warnings == ("16-bit image scaled from its full range 0..4095 to 0..255",)


def test_load_image_gives_the_first_page_and_says_the_others_were_ignored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pages.tif"
    path.write_bytes(three_page_tiff())
    image = load_image(path)
    assert (image.pixels == (200, 10, 10)).all()
    p = prov(image)
    assert (p.frame_index, p.frames) == (0, 3)
    assert p.warnings == ("image has 3 pages; only the first was used, the others were ignored",)


def test_max_pages_reads_the_first_pages_only() -> None:
    pages = load_pages(three_page_tiff(), max_pages=2)
    assert len(pages) == 2
    assert (pages[0].pixels == (200, 10, 10)).all()
    assert all("image has 3 pages; the first 2 were read" in prov(p).warnings for p in pages)
    with pytest.raises(ImageError, match="max_pages"):
        load_pages(three_page_tiff(), max_pages=0)


def test_page_limits_are_checked_before_any_page_is_decoded() -> None:
    data = three_page_tiff()
    with limits.applied(limits.ImageLimits(max_frames=2)):
        with pytest.raises(ImageError, match="more than 2 pages"):
            load_pages(data)
        assert (load_image(data).pixels == (200, 10, 10)).all()  # the first page is fine
    # Page 2 alone (64x64) is over this limit although page 1 (40x30) is not.
    with (
        limits.applied(limits.ImageLimits(max_pixels=64 * 64 - 1)),
        pytest.raises(ImageError, match=f"more than {64 * 64 - 1} pixels"),
    ):
        load_pages(data)
    # Each page fits, all three together (1200 + 4096 + 400) do not.
    with (
        limits.applied(limits.ImageLimits(max_pixels=5000)),
        pytest.raises(ImageError, match="5000 pixels in all"),
    ):
        load_pages(data)
    assert len(load_pages(data)) == 3


def test_each_tiff_page_gets_its_own_orientation() -> None:
    upright = Image.new("RGB", (40, 20), RED)
    turned = np.zeros((20, 40, 3), dtype=np.uint8)
    turned[:, :10] = BLUE  # stored: blue left band; orientation 6 puts it on top
    buffer = io.BytesIO()
    with TiffImagePlugin.AppendingTiffWriter(buffer, new=True) as tiff:
        upright.save(tiff, format="TIFF")
        tiff.newFrame()
        Image.fromarray(turned).save(tiff, format="TIFF", tiffinfo={274: 6})
        tiff.newFrame()
    first, second = load_pages(buffer.getvalue())
    assert prov(first).orientation is None and (first.pixels == RED).all()
    assert prov(second).orientation == 6
    assert (second.pixels[10] == BLUE).all() and (second.pixels[-10] == BLACK).all()


def test_single_page_picture_and_array_give_one_page() -> None:
    assert len(load_pages(encode(Image.new("RGB", (8, 8)), "PNG"))) == 1
    assert len(load_pages(np.zeros((8, 8, 3), dtype=np.uint8))) == 1


@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_16bit_ramp_is_scaled_over_its_range_not_clipped(fmt: str) -> None:
    data = encode(ramp16(256, 64, lo=1000, hi=60000), fmt)
    image = load_image(data)
    assert_left_to_right_ramp(image.pixels)
    assert 120 < image.pixels.mean() < 135  # a ramp, not a white sheet
    p = prov(image)
    assert (p.source_mode, p.recipe, p.window) == ("I;16", "min_max", (1000.0, 60000.0))


def test_float_tiff_is_scaled_and_non_finite_values_shown_black() -> None:
    values = np.tile(np.linspace(-1.0, 1.0, SIDE, dtype=np.float32), (SIDE, 1))
    values[0, SIDE // 2] = np.nan
    image = load_image(encode(Image.fromarray(values), "TIFF"))
    assert image.pixels[5, 0, 0] == 0 and image.pixels[5, -1, 0] == 255
    assert image.pixels[0, SIDE // 2, 0] == 0
    assert prov(image).window == (-1.0, 1.0)


def test_uniform_16bit_image_is_black_with_a_warning() -> None:
    image = load_image(encode(Image.fromarray(np.full((8, 8), 500, np.uint16)), "PNG"))
    assert (image.pixels == 0).all()
    assert prov(image).warnings == ("16-bit image holds the single value 500; shown black",)


# ------------------------------------------------------------------ colour modes


def halves(mode: str, left: Any, right: Any) -> Image.Image:
    """An 896x896 image of `mode`, one value on the left half, another on the right."""
    image = Image.new(mode, (SIDE, SIDE), left)
    image.paste(Image.new(mode, (SIDE // 2, SIDE), right), (SIDE // 2, 0))
    return image


def left_right(pixels: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    left, right = pixels[:, : SIDE // 2], pixels[:, SIDE // 2 :]
    assert (left == left[0, 0]).all() and (right == right[0, 0]).all()
    return tuple(int(v) for v in left[0, 0]), tuple(int(v) for v in right[0, 0])


def test_rgba_alpha_is_dropped_like_the_gemma_processor() -> None:
    # Transparent on the left, opaque on the right: both keep the colour the file stores.
    image = load_image(encode(halves("RGBA", (10, 200, 30, 0), (90, 40, 220, 255)), "PNG"))
    assert left_right(image.pixels) == ((10, 200, 30), (90, 40, 220))
    assert prov(image).source_mode == "RGBA"
    assert any("alpha channel dropped" in w for w in prov(image).warnings)
    opaque = load_image(encode(halves("RGBA", (1, 2, 3, 255), (4, 5, 6, 255)), "PNG"))
    assert prov(opaque).warnings == ()  # nothing was dropped


def test_la_becomes_grey_rgb() -> None:
    image = load_image(encode(halves("LA", (100, 0), (30, 255)), "PNG"))
    assert left_right(image.pixels) == ((100, 100, 100), (30, 30, 30))
    assert any("alpha channel dropped" in w for w in prov(image).warnings)


@pytest.mark.parametrize(("fmt", "tolerance"), [("TIFF", 0), ("JPEG", 8)])
def test_cmyk_becomes_rgb(fmt: str, tolerance: int) -> None:
    # Full magenta and yellow: red. Full cyan and yellow: green.
    image = load_image(encode(halves("CMYK", (0, 255, 255, 0), (255, 0, 255, 0)), fmt))
    assert near(image.pixels[400, 100], RED, tolerance)
    assert near(image.pixels[400, 800], (0, 255, 0), tolerance)
    if fmt == "TIFF":  # lossless: every pixel exact
        assert left_right(image.pixels) == ((255, 0, 0), (0, 255, 0))
    p = prov(image)
    assert p.source_mode == "CMYK"
    assert "CMYK converted to RGB without colour management" in p.warnings


def test_palette_image_becomes_its_palette_colours() -> None:
    image = Image.new("P", (SIDE, SIDE), 0)
    image.putpalette([12, 34, 56, 200, 100, 0] + [0, 0, 0] * 254)
    image.paste(1, (SIDE // 2, 0, SIDE, SIDE))
    plain = load_image(encode(image, "PNG"))
    assert left_right(plain.pixels) == ((12, 34, 56), (200, 100, 0))
    assert prov(plain).source_mode == "P" and prov(plain).warnings == ()
    transparent = load_image(encode(image, "PNG", transparency=0))
    assert left_right(transparent.pixels) == ((12, 34, 56), (200, 100, 0))
    assert any("transparency dropped" in w for w in prov(transparent).warnings)


def test_one_bit_image_becomes_black_and_white() -> None:
    image = load_image(encode(halves("1", 0, 1), "PNG"))
    assert left_right(image.pixels) == ((0, 0, 0), (255, 255, 255))
    assert prov(image).source_mode == "1"


def test_rgba_array_alpha_takes_no_part_in_the_scaling() -> None:
    array = np.zeros((SIDE, SIDE, 4), dtype=np.uint16)
    array[..., 0] = 1000
    array[..., 3] = 65535
    image = load_image(array)
    assert (image.pixels[..., 0] == 255).all() and (image.pixels[..., 1:] == 0).all()
    p = prov(image)
    assert (p.kind, p.recipe, p.window) == ("array", "min_max", (0.0, 1000.0))


# ------------------------------------------------------------------ tiling

ROWS, COLS = 3, 4
TISSUE = [(0, 1), (1, 0), (1, 2), (1, 3), (2, 2)]
"""Grid cells of the synthetic slide that hold tissue, in row-major order."""


def tissue_pattern(row: int, col: int) -> np.ndarray:
    """A textured patch whose colour says where it sits: 8-pixel checks of two shades."""
    base = np.array([60 + 40 * row, 30 + 35 * col, 150], dtype=np.int32)
    checks = (np.add.outer(np.arange(SIDE) // 8, np.arange(SIDE) // 8) % 2)[..., None]
    return (base + 30 * checks).astype(np.uint8)


@pytest.fixture(scope="module")
def slide() -> np.ndarray:
    """3 x 4 tiles of 896: near-white glass (with scanner noise) and five tissue tiles."""
    noise = np.random.default_rng(7).integers(236, 256, (ROWS * SIDE, COLS * SIDE, 1))
    pixels = np.repeat(noise.astype(np.uint8), 3, axis=-1)
    for row, col in TISSUE:
        pixels[row * SIDE : (row + 1) * SIDE, col * SIDE : (col + 1) * SIDE] = tissue_pattern(
            row, col
        )
    return pixels


@pytest.fixture(scope="module")
def slide_png(slide: np.ndarray) -> bytes:
    return encode(Image.fromarray(slide), "PNG", compress_level=1)


def tprov(image: Any) -> TileProvenance:
    assert isinstance(image.provenance, TileProvenance)
    return image.provenance


def test_tissue_tiles_come_in_row_major_order_with_their_boxes(slide_png: bytes) -> None:
    tiles = tile_image(slide_png)
    assert isinstance(tiles, TileSet) and len(tiles) == len(TISSUE)
    assert (tiles.grid, tiles.image_size, tiles.region) == (
        (ROWS, COLS),
        (COLS * SIDE, ROWS * SIDE),
        (0, 0, COLS * SIDE, ROWS * SIDE),
    )
    assert (tiles.tissue_tiles, tiles.skipped_background) == (5, 7)
    assert tiles.boxes == tuple((c * SIDE, r * SIDE, SIDE, SIDE) for r, c in TISSUE)
    for number, (image, (row, col)) in enumerate(zip(tiles.tiles, TISSUE, strict=True), 1):
        assert np.array_equal(image.pixels, tissue_pattern(row, col))
        p = tprov(image)
        assert (p.patch_number, p.row, p.col, p.grid) == (number, row, col, (ROWS, COLS))
        assert (p.kind, p.recipe, p.padded, p.skipped_background) == ("tile", "tile", False, 7)
        assert p.source_format == "PNG" and p.warnings == ()
    assert tiles.summary()["positions"] == [list(cell) for cell in TISSUE]


def test_array_source_and_background_none(slide: np.ndarray) -> None:
    every = tile_image(slide, background=None)
    assert len(every) == ROWS * COLS and every.skipped_background == 0
    assert [(tprov(t).row, tprov(t).col) for t in every.tiles] == [
        (r, c) for r in range(ROWS) for c in range(COLS)
    ]
    assert np.array_equal(every.tiles[1].pixels, tissue_pattern(0, 1))


def test_region_is_tiled_from_its_own_corner_with_a_padded_edge(slide: np.ndarray) -> None:
    # Columns 1-2 of row 1 in full, then the top 200 rows of row 2 (padded with white).
    tiles = tile_image(slide, region=(SIDE, SIDE, 2 * SIDE, SIDE + 200))
    assert tiles.grid == (2, 2) and tiles.region == (SIDE, SIDE, 2 * SIDE, SIDE + 200)
    assert [(tprov(t).row, tprov(t).col) for t in tiles.tiles] == [(0, 1), (1, 1)]
    assert tiles.boxes == ((2 * SIDE, SIDE, SIDE, SIDE), (2 * SIDE, 2 * SIDE, SIDE, 200))
    assert tiles.skipped_background == 2
    full, edge = tiles.tiles
    assert np.array_equal(full.pixels, tissue_pattern(1, 2))
    assert np.array_equal(edge.pixels[:200], tissue_pattern(2, 2)[:200])
    assert (edge.pixels[200:] == 255).all()
    assert tprov(edge).padded and "edge tile padded with white from 896x200" in tprov(edge).warnings


def test_a_sliver_that_is_mostly_padding_is_background(slide: np.ndarray) -> None:
    # 64 tissue rows are 7% of the padded patch: more than 90% of it is white.
    tiles = tile_image(slide, region=(2 * SIDE, SIDE, SIDE, SIDE + 64))
    assert tiles.boxes == ((2 * SIDE, SIDE, SIDE, SIDE),)
    assert tiles.skipped_background == 1


def test_more_tissue_than_max_tiles_is_sampled_evenly(slide: np.ndarray) -> None:
    tiles = tile_image(slide, max_tiles=3)
    kept = [TISSUE[0], TISSUE[2], TISSUE[4]]  # first, middle, last in spatial order
    assert [(tprov(t).row, tprov(t).col) for t in tiles.tiles] == kept
    assert [tprov(t).patch_number for t in tiles.tiles] == [1, 2, 3]
    note = "3 of 5 tissue tiles kept, sampled evenly in spatial order"
    assert tiles.warnings == (note,) and all(note in tprov(t).warnings for t in tiles.tiles)
    assert tiles.tissue_tiles == 5
    every = tile_image(slide, max_tiles=5, background=None)
    assert [tprov(t).row * COLS + tprov(t).col for t in every.tiles] == [0, 3, 6, 8, 11]


def test_smaller_tiles_are_resized_to_the_model_size() -> None:
    source = np.zeros((448, 896, 3), dtype=np.uint8)
    source[:, :448] = tissue_pattern(0, 0)[:448, :448]
    source[:, 448:] = tissue_pattern(2, 3)[:448, :448]
    tiles = tile_image(source, tile=448)
    assert tiles.grid == (1, 2) and len(tiles) == 2
    for image, (row, col) in zip(tiles.tiles, [(0, 0), (2, 3)], strict=True):
        assert image.pixels.shape == (SIDE, SIDE, 3)
        expected = tissue_pattern(row, col)[:448, :448].reshape(-1, 3).mean(axis=0)
        assert np.abs(image.pixels.reshape(-1, 3).mean(axis=0) - expected).max() < 2
        assert tprov(image).recipe == "tile_resize"
    assert "tiles of 448 pixels resized to 896" in tiles.warnings


def test_background_rule_thresholds() -> None:
    assert (WHITE_LEVEL, BACKGROUND_FRACTION, FLAT_STD) == (220, 0.9, 4.0)
    checks = (np.add.outer(np.arange(100), np.arange(100)) % 2)[..., None]

    def textured(low: tuple[int, int, int], high: tuple[int, int, int]) -> np.ndarray:
        return np.where(checks == 1, np.array(high), np.array(low)).astype(np.uint8)

    tissue = textured((120, 40, 130), (160, 80, 170))
    assert not is_background(tissue)
    for white_rows, expected in [(91, True), (89, False)]:
        patch = tissue.copy()
        patch[:white_rows] = textured((221, 221, 221), (250, 250, 250))[:white_rows]
        assert is_background(patch) is expected, white_rows
    assert is_background(textured((221, 221, 221), (250, 250, 250)))  # above 220: white
    assert not is_background(textured((220, 220, 220), (240, 240, 240)))  # 220 is not
    assert not is_background(textured((255, 255, 150), (255, 255, 200)))  # every channel
    assert is_background(textured((118, 118, 118), (122, 122, 122)))  # std 2: flat
    assert not is_background(textured((115, 115, 115), (125, 125, 125)))  # std 5
    assert is_background(np.full((100, 100, 3), (120, 60, 150), dtype=np.uint8))
    half = tissue.copy()
    half[:50] = 255
    assert not is_background(half) and is_background(half, 0.4)


@pytest.mark.parametrize(
    "region",
    [(0, 0, COLS * SIDE + 1, SIDE), (-1, 0, 10, 10), (3000, 2600, 600, 100), (0, 0, 0, 10)],
)
def test_region_outside_the_image_is_refused(slide: np.ndarray, region: Any) -> None:
    with pytest.raises(ImageError, match="region") as caught:
        tile_image(slide, region=region)
    assert "\n" not in str(caught.value)


def test_all_background_is_refused() -> None:
    with pytest.raises(ImageError, match="no tissue found: all 2 tiles are background"):
        tile_image(np.full((SIDE, 2 * SIDE, 3), 245, dtype=np.uint8))


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"not an image at all",
        np.zeros((0, 0, 3), dtype=np.uint8),
        encode(Image.new("RGB", (900, 900), (1, 2, 3)), "PNG")[:200],
    ],
)
def test_empty_or_corrupt_input_is_refused(bad: Any) -> None:
    with pytest.raises(ImageError):
        tile_image(bad)


@pytest.mark.parametrize(
    "options", [{"tile": 10}, {"max_tiles": 0}, {"background": 0.0}, {"background": 1.5}]
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ImageError):
        tile_image(np.zeros((SIDE, SIDE, 3), dtype=np.uint8), **options)


def test_pixel_limit_is_applied_from_the_header_before_decoding(slide_png: bytes) -> None:
    header_only = encode(Image.new("RGB", (3000, 2000)), "PNG")[:100]  # no pixel data
    with pytest.raises(ImageError, match="truncated or corrupt"):
        tile_image(header_only)
    with (
        limits.applied(limits.ImageLimits(max_pixels=3000 * 2000 - 1)),
        pytest.raises(ImageError, match="more than 5999999 pixels"),
    ):
        tile_image(header_only)  # refused from the header: the missing pixels never read
    total = ROWS * SIDE * COLS * SIDE
    with (
        limits.applied(limits.ImageLimits(max_pixels=total - 1)),
        pytest.raises(ImageError, match=f"more than {total - 1} pixels"),
    ):
        tile_image(slide_png)
    with limits.applied(limits.ImageLimits(max_pixels=total)):
        assert len(tile_image(slide_png)) == len(TISSUE)


def test_tile_messages_put_each_patch_before_its_label(slide: np.ndarray) -> None:
    tiles = tile_image(slide, max_tiles=3)
    (message,) = tile_messages("Is there tumour?", tiles)
    assert message.role == "user"
    parts = list(message.parts)
    assert parts[0].startswith("You are reviewing 3 non-overlapping patches")
    assert parts[1] is tiles.tiles[0] and parts[2] == "PATCH 1 (row 1, column 2)"
    assert parts[3] is tiles.tiles[1] and parts[4] == "PATCH 2 (row 2, column 3)"
    assert parts[5] is tiles.tiles[2] and parts[6] == "PATCH 3 (row 3, column 3)"
    assert parts[7] == "Is there tumour?" and len(parts) == 8
    (own,) = tile_messages("Q?", list(tiles.tiles[:1]), instruction="Look.")
    assert list(own.parts) == ["Look.", tiles.tiles[0], "PATCH 1 (row 1, column 2)", "Q?"]
    plain = load_image(np.zeros((8, 8, 3), dtype=np.uint8))
    assert list(tile_messages("Q?", [plain])[0].parts)[2] == "PATCH 1"
    with pytest.raises(ImageError):
        tile_messages("Q?", [])
