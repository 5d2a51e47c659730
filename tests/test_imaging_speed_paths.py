"""The fast paths of the imaging package give the very bytes of the plain ones.

- windows through a lookup table over the stored values equal the float64 formula on the
  modality values, for every 8-bit and 16-bit stored value, every CT window and preset,
  min-max and the file's LINEAR windows, under several rescales;
- a grey image resized as one channel, and three windows resized from Pillow's own RGB
  layout, equal `square_rgb` of the three channels;
- a volume parses each file once (its header, then the rest of the file from where the
  header stopped), reads the pixel data of the sampled files only, and falls back to a
  whole read when the rest is not where the header said.

Correctness only: speed is measured by `bench/imaging.py`, never asserted here.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from coheara.errors import ImageError  # noqa: E402
from coheara.imaging import dicom as dcm  # noqa: E402
from coheara.imaging import image as img  # noqa: E402
from coheara.imaging import volume as vol  # noqa: E402
from coheara.imaging.dicom import load_dicom  # noqa: E402
from coheara.imaging.volume import load_volume  # noqa: E402

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"

RESCALES = [(1.0, 0.0), (1.0, -1024.0), (0.5, -20.25), (2.0, 3.0), (-1.0, 100.0), (0.1, -1000.0)]
"""(slope, intercept): none, a CT's, fractional, steep, negative and inexact in binary."""


def rescaled(slope: float, intercept: float) -> Dataset:
    ds = Dataset()
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    return ds


def every_value(dtype: str) -> np.ndarray:
    """Every value a 8-bit or 16-bit dtype holds, as an image (256 rows)."""
    kind = np.dtype(dtype)
    values = np.arange(1 << (8 * kind.itemsize), dtype=np.int64)
    values = values.astype(kind.str.replace("i", "u")).view(kind)
    return values.reshape(256, -1)


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return Path(str(path))


# ----- windows by table ------------------------------------------------------------------


WINDOWS: list[tuple[float, float]] = [
    *dcm.CT_WINDOWS,
    *((c - w / 2.0, c + w / 2.0) for c, w in dcm.CT_PRESETS.values()),
    (-0.5, 0.5),
    (100.25, 100.75),
    (-40000.0, 70000.0),
]


@pytest.mark.parametrize("dtype", ["<i2", "<u2", "|u1", "|i1", ">i2"])
@pytest.mark.parametrize(("slope", "intercept"), RESCALES)
def test_table_windows_equal_the_float_formula_on_every_stored_value(
    dtype: str, slope: float, intercept: float
) -> None:
    stored = every_value(dtype)
    ds = rescaled(slope, intercept)
    values = dcm.modality_values(stored, ds)
    grey = dcm.GreyValues(stored, ds)
    assert grey.by_table  # the table path is the one under test
    for low, high in WINDOWS:
        assert np.array_equal(grey.window(low, high), dcm.scale_window(values, low, high))
    for center, width in dcm.CT_PRESETS.values():
        assert np.array_equal(
            grey.center_width(center, width), dcm.center_width(values, center, width)
        )
    rgbx = grey.rgbx(dcm.CT_WINDOWS)
    assert rgbx.shape == (*stored.shape, 4) and (rgbx[..., 3] == 255).all()
    assert np.array_equal(rgbx[..., :3], dcm.ct_windows(values))
    assert grey.bounds() == (float(values.min()), float(values.max()))
    assert np.array_equal(grey.min_max(), dcm.min_max(values))
    for value_range in [(0.0, 1000.0), (-100.0, 50.5), (0, 1000), (5.0, 5.0)]:
        assert np.array_equal(grey.min_max(value_range), dcm.min_max(values, value_range))
    for center, width in [(40.0, 400.0), (150.0, 101.0), (0.0, 2.0), (-600.0, 1500.0)]:
        for function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            with np.errstate(over="ignore"):  # SIGMOID's exp far from the center
                assert np.array_equal(
                    grey.dicom_window(center, width, function),
                    dcm.dicom_window(values, center, width, function),
                )


def test_int_and_float_bounds_are_different_tables() -> None:
    """min_max((0, 1000)) on int16 clips in int16, min_max((0.0, 1000.0)) in float64:
    a cache keyed on equal values alone would hand one the other's table."""
    stored = every_value("<i2")
    ds = rescaled(1.0, 0.0)
    for value_range in [(0, 1000), (0.0, 1000.0), (0, 1000)]:
        expected = dcm.min_max(stored, value_range)
        assert np.array_equal(dcm.GreyValues(stored, ds).min_max(value_range), expected)


def test_32_bit_values_go_by_table_over_their_range_and_wide_ranges_do_not() -> None:
    ds = rescaled(0.5, -1024.0)
    narrow = (np.arange(-30000, 30000, dtype=np.int32) * 1).reshape(-1, 100)
    grey = dcm.GreyValues(narrow, ds)
    assert grey.by_table
    values = dcm.modality_values(narrow, ds)
    assert np.array_equal(grey.rgbx(dcm.CT_WINDOWS)[..., :3], dcm.ct_windows(values))
    wide = np.array([[-100000, 0, 100000]], dtype=np.int32)
    grey = dcm.GreyValues(wide, ds)
    assert not grey.by_table
    values = dcm.modality_values(wide, ds)
    assert np.array_equal(grey.rgbx(dcm.CT_WINDOWS)[..., :3], dcm.ct_windows(values))
    assert grey.bounds() == (float(values.min()), float(values.max()))


def test_float_values_and_a_modality_lut_are_windowed_on_the_values() -> None:
    floats = np.linspace(-2000.0, 3000.0, 400).reshape(20, 20)
    grey = dcm.GreyValues(floats, rescaled(1.0, -1024.0))
    assert not grey.by_table
    values = dcm.modality_values(floats, rescaled(1.0, -1024.0))
    assert np.array_equal(grey.rgbx(dcm.CT_WINDOWS)[..., :3], dcm.ct_windows(values))

    ds = rescaled(1.0, 0.0)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.ModalityLUTType = "HU"
    lut.LUTData = [int(v) for v in np.arange(4096) * 3 // 2]
    ds.ModalityLUTSequence = [lut]
    stored = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    grey = dcm.GreyValues(stored, ds)
    assert not grey.by_table
    values = dcm.modality_values(stored, ds)
    assert np.array_equal(grey.rgbx(dcm.CT_WINDOWS)[..., :3], dcm.ct_windows(values))
    assert np.array_equal(grey.min_max(), dcm.min_max(values))


def test_a_bad_window_is_refused_as_before() -> None:
    stored = np.zeros((2, 2), np.int16)
    grey = dcm.GreyValues(stored, rescaled(1.0, 0.0))
    with pytest.raises(ImageError, match="window width must be positive"):
        grey.window(5.0, 5.0)
    with pytest.raises(ImageError, match="window width must be positive"):
        grey.center_width(5.0, 0.0)
    with pytest.raises(ImageError, match="window width must be at least 1"):
        grey.dicom_window(5.0, 0.5, "LINEAR")


# ----- square resize ---------------------------------------------------------------------


SIZES = [(512, 512), (300, 700), (1024, 1024), (1, 1), (896, 896), (895, 897), (2, 1500)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_grey_and_rgbx_squares_equal_the_three_channel_square(height: int, width: int) -> None:
    rng = np.random.default_rng(height * 7 + width)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    rgb[: height // 2] //= 7  # smooth and sharp regions alike
    expected = img.square_rgb(rgb)
    grey = np.ascontiguousarray(rgb[..., 1])
    assert np.array_equal(img.square_gray(grey), img.square_rgb(np.stack([grey] * 3, axis=-1)))
    packed = np.concatenate([rgb, np.full((height, width, 1), 255, np.uint8)], axis=-1)
    out = img.square_rgbx(packed)
    assert out.shape == (896, 896, 3) and out.dtype == np.uint8
    assert np.array_equal(out, expected)
    assert out.flags.c_contiguous and img.square_gray(grey).flags.c_contiguous


def test_square_helpers_refuse_the_wrong_shapes() -> None:
    with pytest.raises(ImageError):
        img.square_gray(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageError):
        img.square_gray(np.zeros((0, 4), np.uint8))
    with pytest.raises(ImageError):
        img.square_rgbx(np.zeros((4, 4, 3), np.uint8))


def png(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize(("height", "width"), [(300, 500), (1200, 1000), (896, 896), (7, 3)])
def test_grey_pictures_and_arrays_equal_their_rgb_conversion_resized(
    height: int, width: int
) -> None:
    """A grey picture is resized as one channel: the bytes of convert("RGB") then resize."""
    rng = np.random.default_rng(height + width)
    grey = rng.integers(0, 256, (height, width), dtype=np.uint8)
    picture = Image.fromarray(grey, mode="L")

    def reference(image: Image.Image) -> np.ndarray:
        rgb = image.convert("RGB")
        if rgb.size != (896, 896):
            rgb = rgb.resize((896, 896), Image.Resampling.BILINEAR)
        return np.asarray(rgb)

    expected = reference(picture)
    for source in (png(picture), png(picture, transparency=7), picture):
        assert np.array_equal(img.load_image(source).pixels, expected)
    assert np.array_equal(img.load_image(grey).pixels, expected)
    assert np.array_equal(img.load_image(grey[..., None]).pixels, expected)
    deep = (grey.astype(np.uint16) * 200 + 7).astype(np.uint16)
    scaled = img.load_image(png(Image.fromarray(deep)))
    assert scaled.provenance is not None and scaled.provenance.recipe == "min_max"
    lo, hi = float(deep.min()), float(deep.max())
    levels = np.round((deep.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    assert np.array_equal(scaled.pixels, reference(Image.fromarray(levels, mode="L")))
    upright, _ = img.decode_rgb(png(picture))
    assert upright.mode == "RGB"  # tiles still get RGB at full resolution


def test_prepared_pixels_are_not_copied_again_but_still_encode() -> None:
    path = bundled("CT_small.dcm")
    [image] = load_dicom(path)
    assert image.pixels.shape == (896, 896, 3) and image.pixels.flags.c_contiguous
    assert np.array_equal(np.asarray(image.to_pil()), image.pixels)
    assert image.png_bytes().startswith(b"\x89PNG")


# ----- one parse per file in a volume ------------------------------------------------------


def slice_bytes(
    k: int,
    *,
    series: str,
    transfer: UID = ExplicitVRLittleEndian,
    modality: str = "CT",
    side: int = 16,
) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE if modality == "CT" else MR_IMAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = 2
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if modality == "CT":
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ramp = np.add.outer(np.arange(side), np.arange(side)) * 40 + 30 * k
    big_endian = transfer == ExplicitVRBigEndian
    pixels = ramp.astype(">i2" if big_endian else "<i2")
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(
        buffer,
        enforce_file_format=True,
        implicit_vr=transfer == ImplicitVRLittleEndian,
        little_endian=not big_endian,
    )
    return buffer.getvalue()


def write_series(folder: Path, count: int, **options: Any) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    paths = []
    for k in range(count):
        path = folder / f"IM{(k * 7) % count:04d}_{k}.dcm"
        path.write_bytes(slice_bytes(k, series=series, **options))
        paths.append(path)
    return paths


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize(
    "transfer", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_a_volume_parses_each_file_once_and_gives_load_dicoms_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transfer: UID
) -> None:
    paths = write_series(tmp_path / "s", 6, transfer=transfer)
    expected = [load_dicom(p)[0].pixels for p in paths]
    parses = count_calls(monkeypatch, vol.pydicom, "dcmread")
    rests = count_calls(monkeypatch, vol, "_rest_of")
    whole = count_calls(monkeypatch, dcm, "read_dataset")
    volume = load_volume(tmp_path / "s")
    assert len(parses) == 6 and len(rests) == 6 and not whole
    assert all(np.array_equal(s.pixels, e) for s, e in zip(volume.slices, expected, strict=True))
    as_bytes = [p.read_bytes() for p in reversed(paths)]
    parses.clear()
    again = load_volume(as_bytes)
    assert len(parses) == 6 and not whole
    assert all(np.array_equal(s.pixels, e) for s, e in zip(again.slices, expected, strict=True))


def test_only_the_sampled_files_have_their_pixel_data_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_series(tmp_path, 10)
    parses = count_calls(monkeypatch, vol.pydicom, "dcmread")
    rests = count_calls(monkeypatch, vol, "_rest_of")
    volume = load_volume(tmp_path, max_slices=4)
    assert len(volume.slices) == 4
    assert len(parses) == 10  # every header, once
    assert len(rests) == 4  # the rest of the sampled files only


def test_a_multiframe_volume_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = 5
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = generate_uid()
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameIncrementPointer = 0x3004000C
    ds.GridFrameOffsetVector = [float(3 * k) for k in range(frames)]
    ds.PixelData = (np.arange(frames * 64, dtype=np.uint16) * 7).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    expected = [image.pixels for image in load_dicom(data)]
    parses = count_calls(monkeypatch, vol.pydicom, "dcmread")
    volume = load_volume(data)
    assert len(parses) == 1
    assert all(np.array_equal(s.pixels, e) for s, e in zip(volume.slices, expected, strict=True))


def test_the_rest_is_read_whole_again_when_it_is_not_where_the_header_stopped(
    tmp_path: Path,
) -> None:
    [path] = write_series(tmp_path, 1)
    parsed = vol._read_header(path)
    assert parsed is not None
    ds, follows, at = parsed
    assert follows and at is not None
    assert path.read_bytes()[at : at + 4] == b"\xe0\x7f\x10\x00"
    header = vol._Header(path, 0, ds, at - 2)  # as if the file had changed since
    whole = vol._with_pixels(header)
    assert whole is not ds and whole.PixelData == dcm.read_dataset(path).PixelData
    fresh = vol._read_header(path)
    assert fresh is not None
    same = vol._with_pixels(vol._Header(path, 0, fresh[0], fresh[2]))
    assert same is fresh[0] and same.PixelData == dcm.read_dataset(path).PixelData


def test_bundled_files_read_once_in_a_volume_equal_their_whole_read() -> None:
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"):
        path = bundled(name)
        parsed = vol._read_header(path)
        assert parsed is not None and parsed[2] is not None
        ds = vol._with_pixels(vol._Header(path, 0, parsed[0], parsed[2]))
        whole = dcm.read_dataset(path)
        assert ds.PixelData == whole.PixelData and set(ds.keys()) == set(whole.keys())
        for recipe in ("min_max", "ct_windows"):
            [alone] = load_dicom(path, recipe=recipe)
            [first] = load_volume([path], recipe=recipe).slices
            assert np.array_equal(first.pixels, alone.pixels)


def test_a_deflated_file_is_read_whole() -> None:
    path = bundled("image_dfl.dcm")
    parsed = vol._read_header(path)
    assert parsed is not None and parsed[2] is None  # positions in the inflated copy
    header = vol._Header(path, 0, parsed[0], parsed[2])
    assert vol._with_pixels(header).PixelData == dcm.read_dataset(path).PixelData


def test_a_bytes_input_over_the_dicom_limit_is_refused_when_its_pixels_are_read(
    tmp_path: Path,
) -> None:
    from coheara.imaging import limits

    data = slice_bytes(0, series=generate_uid())
    parsed = vol._read_header(data)
    assert parsed is not None and parsed[2] is not None
    header = vol._Header(data, 0, parsed[0], parsed[2])
    small = limits.ImageLimits(max_dicom_bytes=len(data) - 1)
    with limits.applied(small), pytest.raises(ImageError, match="DICOM data is larger"):
        vol._with_pixels(header)
    path = tmp_path / "one.dcm"
    path.write_bytes(data)
    header = vol._Header(path, 0, parsed[0], parsed[2])
    with limits.applied(small), pytest.raises(ImageError, match="image file is larger"):
        vol._with_pixels(header)
