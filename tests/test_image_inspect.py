"""`coheara image inspect`: the sheet shows the very pixels the model gets, in its order.

Series are written by `test_volume`'s helpers: shuffled, under file names that count down
against the anatomy, with a canary patient name that must never be printed. The command
runs in process through `coheara.cli.main.main`, as a user's `coheara` does.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pydicom")

from coheara.cli.main import main
from coheara.imaging import Prepared, PreparedImage, Provenance, prepare, preview
from coheara.imaging.dicom import ct_windows
from test_volume import assert_no_canary, write_series

# Uniform slices, one HU value each, chosen to light every channel differently.
HUS = (-1000, -300, 0, 40, 100, 180, 900)
WINDOWS = ((-1024, 1024), (-135, 215), (0, 80))


def rgb_of(hu: float) -> tuple[int, int, int]:
    """The bytes the three CT windows give one HU value, computed here from the recipe."""
    return tuple(  # type: ignore[return-value]
        round((min(max(hu, lo), hi) - lo) * 255 / (hi - lo)) for lo, hi in WINDOWS
    )


def uniform_series(folder: Path, hus: tuple[int, ...] = HUS) -> list[Path]:
    pixels = [np.full((8, 8), hu + 1024, dtype=np.uint16) for hu in hus]
    return write_series(folder, len(hus), pixels=pixels)


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str, str]:
    """`coheara image inspect ARGS` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["coheara", "image", "inspect", *args])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def sheet(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image).copy()


def crop(pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    return pixels[top:bottom, left:right]


# ----- a volume: the contact sheet ------------------------------------------------------


def test_volume_sheet_shows_each_slice_in_anatomical_order_under_its_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uniform_series(tmp_path / "series")
    out = tmp_path / "sheet.png"
    code, stdout, stderr = run(
        capsys, monkeypatch, str(tmp_path / "series"), "--thumb", "64", "--out", str(out)
    )
    assert code == 0, stderr
    pixels = sheet(out)
    # 7 slices: 3 columns, 3 rows of a 64 px thumbnail over its caption strip.
    strip = preview.label_height(64)
    assert strip == 16
    gap = preview.GAP
    assert pixels.shape == (3 * (64 + strip) + 4 * gap, 3 * 64 + 4 * gap, 3)
    cells = preview.layout(len(HUS), 64)
    for k, hu in enumerate(HUS):
        thumb = crop(pixels, cells.box(k))
        # A uniform slice stays one exact colour: the sheet shows the anatomical k-th slice
        # in cell k, although files were shuffled and their names count down.
        assert thumb.shape == (64, 64, 3)
        assert np.all(thumb == rgb_of(hu)), (k, hu, np.unique(thumb.reshape(-1, 3), axis=0))
        caption = crop(pixels, cells.label_box(k))
        assert caption.max() > 200  # text drawn in the strip, not on the slice
    captions = [crop(pixels, cells.label_box(k)) for k in range(len(HUS))]
    assert not np.array_equal(captions[0], captions[1])  # SLICE 1 is not SLICE 2
    assert np.all(pixels[:gap, :] == preview.BACKGROUND)  # the top margin is background
    assert "ct_windows" in stdout and "position" in stdout and "7 slices of 7" in stdout
    assert "R -1024..1024, G -135..215, B 0..80 HU" in stdout
    assert_no_canary(stdout, stderr)
    assert "IM0" not in stdout + stderr  # no file name either


def test_labels_are_the_labels_the_model_reads() -> None:
    images = tuple(prepare(np.full((4, 4, 3), k, np.uint8)).images[0] for k in range(3))
    assert Prepared(images, kind="volume").labels() == ["SLICE 1", "SLICE 2", "SLICE 3"]
    assert Prepared(images[:2], kind="pair").labels() == ["PRIOR", "CURRENT"]
    # A kind this module does not know (added later) gets the generic grid and labels.
    tiles = Prepared(images, kind="unknown")
    assert tiles.labels() == ["image 1", "image 2", "image 3"]
    assert preview.render(tiles, thumb=16).layout == "grid"


def test_a_thumbnail_is_the_area_average_of_the_prepared_slice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(11)
    pixels = [rng.integers(0, 2400, (12, 10)).astype(np.uint16) for _ in range(3)]
    write_series(tmp_path / "series", 3, pixels=pixels)
    out = tmp_path / "sheet.png"
    code, _, stderr = run(
        capsys,
        monkeypatch,
        str(tmp_path / "series"),
        "--thumb",
        "64",
        "--columns",
        "3",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    drawn = sheet(out)
    assert drawn.shape[1] == 3 * 64 + 4 * preview.GAP  # one row of three
    cells = preview.layout(3, 64, 3)
    for k, image in enumerate(prepare(tmp_path / "series").images):
        thumb = crop(drawn, cells.box(k)).astype(np.float64)
        # 896 / 64 = 14: each thumbnail pixel is the mean of a 14 x 14 block of the slice.
        blocks = image.pixels.reshape(64, 14, 64, 14, 3).mean(axis=(1, 3))
        assert np.abs(thumb - blocks).max() <= 1.0
        assert np.abs(thumb.mean(axis=(0, 1)) - image.pixels.mean(axis=(0, 1))).max() < 0.5


def test_max_slices_samples_and_json_gives_the_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uniform_series(tmp_path / "series")
    out = tmp_path / "sheet.png"
    code, stdout, stderr = run(
        capsys,
        monkeypatch,
        str(tmp_path / "series"),
        "--max-slices",
        "3",
        "--thumb",
        "32",
        "--json",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["kind"] == "volume" and summary["images"] == 3 and summary["slices"] == 3
    assert summary["series_slices"] == 7 and summary["sampled"] == [0, 3, 6]
    assert summary["ordered_by"] == "position" and summary["recipe"] == "ct_windows"
    assert "7 slices sampled evenly to 3" in summary["warnings"]
    assert summary["preview"] == {
        "layout": "contact_sheet",
        "columns": 2,
        "rows": 2,
        "thumb": 32,
        "width": 2 * 32 + 3 * preview.GAP,
        "height": 2 * (32 + preview.label_height(32)) + 3 * preview.GAP,
    }
    drawn = sheet(out)
    assert drawn.shape[:2] == (summary["preview"]["height"], summary["preview"]["width"])
    cells = preview.layout(3, 32)
    for cell, k in enumerate(summary["sampled"]):
        assert np.all(crop(drawn, cells.box(cell)) == rgb_of(HUS[k]))
    assert_no_canary(stdout, stderr)


def test_a_preset_reaches_the_sheet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = uniform_series(tmp_path / "series", (-600, 0, 150))
    out = tmp_path / "lung.png"
    # Two files of the series, given out of order, are a volume too.
    code, stdout, stderr = run(
        capsys,
        monkeypatch,
        str(paths[2]),
        str(paths[0]),
        "--window",
        "-600,1500",
        "--thumb",
        "16",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    drawn = sheet(out)
    cells = preview.layout(2, 16)
    # center -600, width 1500: -1350..150 HU; -600 HU is mid grey, 150 HU the top.
    assert np.all(crop(drawn, cells.box(0)) == round(750 * 255 / 1500))
    assert np.all(crop(drawn, cells.box(1)) == 255)
    assert "custom: center -600, width 1500" in stdout


# ----- one CT image: the composite and its three windows --------------------------------


def test_one_ct_image_shows_the_composite_beside_its_three_windows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    hu = rng.integers(-1100, 1300, (16, 16))
    (path,) = write_series(tmp_path / "one", 1, pixels=[(hu + 1024).clip(0).astype(np.uint16)])
    out = tmp_path / "ct.png"
    code, stdout, stderr = run(capsys, monkeypatch, str(path), "--out", str(out))
    assert code == 0, stderr
    drawn = sheet(out)
    cells = preview.layout(4, 896, 4)
    assert drawn.shape == (
        896 + preview.label_height(896) + 2 * preview.GAP,
        4 * 896 + 5 * preview.GAP,
        3,
    )
    composite = crop(drawn, cells.box(0))
    # At the model's size nothing is resampled: the composite is what the model gets.
    assert np.array_equal(composite, prepare(path).images[0].pixels)
    for channel in range(3):
        grey = crop(drawn, cells.box(channel + 1))
        assert np.array_equal(grey[..., 0], composite[..., channel])
        assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(
            grey[..., 1], grey[..., 2]
        )
    # The channels hold the three windows: the top-left corner is the stored top-left pixel.
    assert tuple(composite[0, 0]) == rgb_of(float(hu[0, 0]))
    assert "ct_channels" in stdout and "kind" in stdout and "dicom" in stdout
    assert_no_canary(stdout, stderr)


def test_ct_channels_at_a_thumbnail_size_split_the_downscaled_composite() -> None:
    hu = np.linspace(-1100, 400, 896 * 896).reshape(896, 896)
    provenance = Provenance(kind="dicom", recipe="ct_windows", window=WINDOWS)
    ct = PreparedImage(ct_windows(hu), provenance=provenance)
    drawn = np.asarray(preview.ct_channels(ct, panel=128))
    cells = preview.layout(4, 128, 4)
    composite = crop(drawn, cells.box(0))
    for channel in range(3):
        assert np.array_equal(crop(drawn, cells.box(channel + 1))[..., 1], composite[..., channel])
    assert preview.channel_captions(ct) == ["R -1024..1024 HU", "G -135..215 HU", "B 0..80 HU"]
    assert preview.channel_captions(replace(ct, provenance=None)) == [
        "R channel",
        "G channel",
        "B channel",
    ]


# ----- pictures -------------------------------------------------------------------------


def test_pictures_side_by_side_each_as_the_model_gets_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    colours = [(200, 30, 60), (10, 220, 90)]
    files = []
    for n, colour in enumerate(colours):
        files.append(tmp_path / f"Doe_John_{n}.png")
        Image.fromarray(np.full((30, 50, 3), colour, np.uint8)).save(files[-1])
    out = tmp_path / "pictures.png"
    code, stdout, stderr = run(
        capsys, monkeypatch, *map(str, files), "--thumb", "48", "--out", str(out)
    )
    assert code == 0, stderr
    drawn = sheet(out)
    cells = preview.layout(2, 48)
    assert (cells.columns, cells.rows) == (2, 1)
    assert drawn.shape == (
        48 + preview.label_height(48) + 2 * preview.GAP,
        2 * 48 + 3 * preview.GAP,
        3,
    )
    for cell, colour in enumerate(colours):
        assert np.all(crop(drawn, cells.box(cell)) == colour)
    assert "images" in stdout and "picture" in stdout and "Doe_John" not in stdout + stderr


def test_one_picture_shows_at_the_model_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    picture = tmp_path / "film.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(picture)
    out = tmp_path / "one.png"
    code, stdout, stderr = run(capsys, monkeypatch, str(picture), "--json", "--out", str(out))
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["kind"] == "image" and summary["images"] == 1
    assert summary["preview"]["layout"] == "grid" and summary["preview"]["thumb"] == 896
    drawn = sheet(out)
    assert np.array_equal(
        crop(drawn, preview.layout(1, 896).box(0)), prepare(picture).images[0].pixels
    )


# ----- refusals: one line, exit 4, nothing written --------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["{missing}", "--out", "{out}"], "image file not found"),
        (
            ["{picture}", "--out", "{tmp}/no/such/folder/x.png"],
            "the folder of --out does not exist",
        ),
        (["{picture}", "--out", "{tmp}/x.jpg"], "--out must name a .png file"),
        (["{picture}", "--out", "{picture}"], "--out is one of the inputs"),
        (["{picture}", "--preset", "lung", "--out", "{out}"], "apply to DICOM input only"),
        (["{picture}", "--window", "40", "--out", "{out}"], "--window must be CENTER,WIDTH"),
        (["{picture}", "--window", "40,-1", "--out", "{out}"], "positive width"),
        (["{picture}", "--modality", "XR", "--out", "{out}"], "unknown modality"),
        (["{series}", "--preset", "nope", "--out", "{out}"], "unknown CT preset"),
    ],
)
def test_bad_input_is_one_line_and_exit_4(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    expected: str,
) -> None:
    picture = tmp_path / "Doe_Jane_MRN123.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    before = picture.read_bytes()
    uniform_series(tmp_path / "series", (0, 10))
    names = {
        "missing": str(tmp_path / "Doe_Jane_MRN999.dcm"),
        "picture": str(picture),
        "series": str(tmp_path / "series"),
        "out": str(tmp_path / "out.png"),
        "tmp": str(tmp_path),
    }
    code, stdout, stderr = run(capsys, monkeypatch, *(a.format(**names) for a in args))
    assert code == 4
    line = one_error_line(stderr)
    assert expected in line and "MRN" not in line and stdout == ""
    assert not (tmp_path / "out.png").exists()
    assert picture.read_bytes() == before
    assert_no_canary(stderr)


def test_a_slide_is_drawn_as_its_tissue_patches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    slide = np.full((896, 896 * 2, 3), 255, np.uint8)  # white background on the left
    texture = np.random.default_rng(5).integers(0, 40, (896, 896, 3), dtype=np.uint8)
    slide[:, 896:] = texture + np.array([120, 30, 110], np.uint8)  # tissue on the right
    path = tmp_path / "slide.png"
    Image.fromarray(slide).save(path)
    out = tmp_path / "patches.png"
    code, stdout, stderr = run(
        capsys, monkeypatch, str(path), "--tiles", "--json", "--out", str(out)
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert (summary["kind"], summary["images"], summary["skipped_background"]) == ("tiles", 1, 1)
    assert summary["positions"] == [[0, 1]]
    code, _, stderr = run(capsys, monkeypatch, str(path), str(path), "--tiles", "--out", str(out))
    assert code == 4 and "--tiles goes with one PATH" in stderr
