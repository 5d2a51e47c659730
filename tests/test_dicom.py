"""DICOM into MedGemma's 896x896 RGB: pydicom's bundled files plus datasets made here.

Only files shipped inside the installed pydicom wheel are used (never downloaded).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)

from coheara.errors import ImageError  # noqa: E402
from coheara.imaging import (  # noqa: E402
    PreparedImage,
    limits,
    load_dicom,
    load_image,
)
from coheara.imaging import dicom as dcm  # noqa: E402

SIDE = 896
CANARY = "CANARY^PATIENT"


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return str(path)


def raw_pixels(name: str) -> np.ndarray:
    return np.asarray(pydicom.dcmread(bundled(name)).pixel_array)


def synthetic(
    pixels: np.ndarray,
    *,
    modality: str = "OT",
    photometric: str = "MONOCHROME2",
    sop_class: str = "1.2.840.10008.5.1.4.1.1.7",
    **attrs: object,
) -> bytes:
    """A small Part 10 file written by pydicom, with a canary patient name."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = CANARY
    ds.PatientID = "CANARY-ID-123"
    ds.InstitutionName = "CANARY HOSPITAL"
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def center(image: PreparedImage) -> np.ndarray:
    return image.pixels[SIDE // 2, SIDE // 2]


# ------------------------------------------------------------------------- CT and windows


def test_ct_small_hounsfield_units_from_rescale() -> None:
    ds = dcm.read_dataset(bundled("CT_small.dcm"))
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    from pydicom.pixels import apply_modality_lut

    hu = apply_modality_lut(ds.pixel_array, ds)
    assert hu[0, :5].tolist() == [-849, -844, -858, -881, -885]  # stored 175 180 166 143 139
    [image] = load_dicom(bundled("CT_small.dcm"))
    assert image.pixels.shape == (SIDE, SIDE, 3) and image.pixels.dtype == np.uint8
    assert image.provenance is not None and image.provenance.recipe == "ct_windows"
    # The recipe on the HU image, before resizing, matches the notebooks' formula.
    rgb = dcm.ct_windows(hu)
    assert rgb[0, 0].tolist() == [round((-849 + 1024) * 255 / 2048), 0, 0]


def test_ct_three_windows_on_known_hounsfield_units() -> None:
    hu = np.array([[-1024.0, 0.0, 100.0, 40.0, -2000.0, 3000.0]])
    rgb = dcm.ct_windows(hu)[0].tolist()
    assert rgb[0] == [0, 0, 0]
    assert rgb[1] == [128, 98, 0]  # 1024/2048*255 = 127.5 -> 128; 135/350*255 = 98.4
    assert rgb[2] == [140, 171, 255]  # 1124/2048*255 = 139.9; 235/350*255 = 171.2; >80
    assert rgb[3] == [132, 128, 128]  # 1064/2048*255 = 132.5 -> 132 (half to even); 175/350
    assert rgb[4] == [0, 0, 0] and rgb[5] == [255, 255, 255]


def test_ct_file_goes_through_three_windows_end_to_end() -> None:
    hu = np.array([[-1024, 0], [100, 40]], dtype=np.int16).repeat(8, 0).repeat(8, 1)
    data = synthetic(
        hu + 1024, modality="CT", RescaleIntercept=-1024, RescaleSlope=1, BitsStored=12
    )
    [image] = load_dicom(data)
    corner = image.pixels
    assert corner[0, 0].tolist() == [0, 0, 0]
    assert corner[0, -1].tolist() == [128, 98, 0]
    assert corner[-1, 0].tolist() == [140, 171, 255]


@pytest.mark.parametrize(
    ("preset", "hu", "expected"),
    [
        ("lung", -600.0, 128),  # centre of 1500/-600
        ("lung", -1350.0, 0),
        ("mediastinum", 225.0, 255),
        ("bone", 400.0 + 450.0, 191),  # (850 - (-500)) / 1800 * 255 = 191.25
        ("brain", 20.0, 64),  # (20 - 0) / 80 * 255 = 63.75
        ("liver", 30.0, 128),
    ],
)
def test_ct_presets(preset: str, hu: float, expected: int) -> None:
    data = synthetic(
        np.full((4, 4), hu + 2048, dtype=np.uint16),
        modality="CT",
        RescaleIntercept=-2048,
        RescaleSlope=1,
    )
    [image] = load_dicom(data, preset=preset)
    assert center(image).tolist() == [expected] * 3
    assert image.provenance is not None and image.provenance.preset == preset


def test_custom_window_and_bad_choices() -> None:
    data = synthetic(np.full((4, 4), 1100, dtype=np.uint16), modality="CT", RescaleIntercept=-1024)
    [image] = load_dicom(data, window=(76.0, 100.0))  # 76 HU at the centre
    assert center(image).tolist() == [128, 128, 128]
    assert image.provenance is not None and image.provenance.preset == "custom"
    with pytest.raises(ImageError, match="unknown CT preset"):
        load_dicom(data, preset="kidney")
    with pytest.raises(ImageError, match="not both"):
        load_dicom(data, preset="lung", window=(0, 10))
    with pytest.raises(ImageError, match="width must be positive"):
        load_dicom(data, window=(0, 0))
    with pytest.raises(ImageError, match="unknown recipe"):
        load_dicom(data, recipe="magic")


# --------------------------------------------------------------- grayscale and windows


def test_monochrome1_is_inverted_so_air_is_dark() -> None:
    # In MONOCHROME1 the lowest value is white: air (high stored value) must come out dark.
    pixels = np.array([[0, 4095]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)
    data = synthetic(pixels, modality="CR", photometric="MONOCHROME1", BitsStored=12)
    [image] = load_dicom(data)
    assert image.pixels[0, 0].tolist() == [255, 255, 255]  # stored 0 -> white
    assert image.pixels[0, -1].tolist() == [0, 0, 0]  # stored 4095 -> black
    assert image.provenance is not None and image.provenance.inverted
    [plain] = load_dicom(synthetic(pixels, modality="CR", BitsStored=12))
    assert plain.pixels[0, 0].tolist() == [0, 0, 0] and not plain.provenance.inverted  # type: ignore[union-attr]


def test_file_window_linear_against_full_range() -> None:
    pixels = np.array([[0, 100, 150, 200, 1000]], dtype=np.uint16).repeat(4, 0)
    windowed = synthetic(pixels, modality="DX", WindowCenter=150, WindowWidth=101)
    [image] = load_dicom(windowed)
    row = image.pixels[SIDE // 2, :, 0]
    # LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5) clipped; x=150 -> 0.505 -> 129.
    assert image.provenance is not None and image.provenance.window == (150.0, 101.0)
    assert image.provenance.voi_function == "LINEAR"
    assert row[0] == 0 and row[-1] == 255
    assert dcm.dicom_window(np.array([150.0]), 150, 101, "LINEAR")[0] == 129
    [full] = load_dicom(synthetic(pixels, modality="DX"))
    assert full.provenance is not None and full.provenance.recipe == "full_range"
    assert full.provenance.window == (0.0, 1000.0)
    assert dcm.min_max(np.array([0.0, 150.0, 1000.0])).tolist() == [0, 38, 255]


def test_window_functions_linear_exact_and_sigmoid() -> None:
    values = np.array([100.0, 150.0, 200.0])
    assert dcm.dicom_window(values, 150, 100, "LINEAR_EXACT").tolist() == [0, 128, 255]
    sigmoid = dcm.dicom_window(values, 150, 100, "SIGMOID").tolist()
    assert sigmoid == [round(255 / (1 + np.exp(2))), 128, round(255 / (1 + np.exp(-2)))]
    data = synthetic(
        np.full((4, 4), 150, dtype=np.uint16),
        WindowCenter=100,
        WindowWidth=100,
        VOILUTFunction="SIGMOID",
    )
    [image] = load_dicom(data)
    assert center(image).tolist() == [round(255 / (1 + np.exp(-2)))] * 3


def test_voi_lut_sequence_is_used() -> None:
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]  # 4 entries from stored value 0, 8-bit output
    lut.add_new(
        0x00283006, "US", [0, 255, 64, 32]
    )  # LUTData  # deliberately not monotonic: only a LUT gives this
    row = np.array([[0, 1, 2, 3]], dtype=np.uint8).repeat(SIDE // 4, 1)  # 896 wide: no resize
    data = synthetic(row.repeat(4, 0), VOILUTSequence=[lut])
    [image] = load_dicom(data, recipe="file_window")
    assert image.provenance is not None and image.provenance.window == "voi_lut"
    assert image.pixels[0, ::224, 0].tolist() == [0, 255, 64, 32]


def test_mr_min_max_and_caller_range() -> None:
    [image] = load_dicom(bundled("MR_small.dcm"))
    assert image.provenance is not None and image.provenance.recipe == "min_max"
    raw = raw_pixels("MR_small.dcm")
    assert image.provenance.window == (float(raw.min()), float(raw.max()))
    assert image.pixels.min() <= 2 and image.pixels.max() >= 250  # bilinear blends extremes
    assert (image.pixels[..., 0] == image.pixels[..., 2]).all()
    [fixed] = load_dicom(bundled("MR_small.dcm"), value_range=(0.0, 4 * float(raw.max())))
    assert fixed.pixels.max() <= 64  # a volume's range darker than the slice's own
    [windowed] = load_dicom(bundled("MR_small.dcm"), recipe="file_window")
    assert windowed.provenance is not None and windowed.provenance.window == (600.0, 1600.0)


def test_signed_pixels_and_bits_stored_below_allocated() -> None:
    pixels = np.array([[-2000, 0, 2000]], dtype=np.int16).repeat(3, 0)
    [image] = load_dicom(synthetic(pixels, modality="OT", BitsStored=12))
    assert image.pixels[0, 0, 0] == 0 and image.pixels[0, -1, 0] == 255
    assert image.pixels[SIDE // 2, SIDE // 2, 0] == 128


# ---------------------------------------------------------------------- colour and codecs


def test_rgb_and_ybr_files_are_kept_in_colour() -> None:
    reference = load_dicom(bundled("SC_rgb_rle.dcm"))[0].pixels.astype(int)
    assert reference.std(axis=-1).mean() > 10  # really in colour
    for name, tolerance in [
        ("SC_ybr_full_422_uncompressed.dcm", 8),
        ("SC_rgb_dcmtk_+eb+cy+n1.dcm", 8),  # JPEG baseline YBR_FULL
        ("SC_rgb_dcmtk_+eb+cy+s2.dcm", 8),  # JPEG baseline YBR_FULL_422
        ("SC_rgb_dcmtk_+eb+cr.dcm", 8),  # JPEG baseline RGB
        ("SC_rgb_gdcm_KY.dcm", 1),  # JPEG 2000
        ("SC_rgb_jls_lossy_line.dcm", 8),  # JPEG-LS near lossless
        ("ExplVR_BigEnd.dcm", None),
    ]:
        [image] = load_dicom(bundled(name))
        assert image.provenance is not None and image.provenance.recipe == "color", name
        assert image.provenance.photometric == "RGB", name
        if tolerance is not None:
            assert np.abs(image.pixels.astype(int) - reference).mean() < tolerance, name


def test_palette_colour_becomes_rgb() -> None:
    [image] = load_dicom(bundled("examples_palette.dcm"))
    assert image.provenance is not None and image.provenance.photometric == "RGB"
    assert image.pixels.std(axis=-1).mean() > 1


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_lossless_codecs_and_byte_orders_match_uncompressed(name: str) -> None:
    reference = load_dicom(bundled("MR_small.dcm"))[0]
    [image] = load_dicom(bundled(name))
    assert np.array_equal(image.pixels, reference.pixels)


def test_rgb_16_bit_and_multiframe() -> None:
    frames = load_dicom(bundled("SC_rgb_rle_16bit_2frame.dcm"))
    assert len(frames) == 2
    assert [f.provenance.frame_index for f in frames] == [0, 1]  # type: ignore[union-attr]
    assert all(f.provenance.frames == 2 for f in frames)  # type: ignore[union-attr]
    eight = load_dicom(bundled("SC_rgb_rle_2frame.dcm"))
    assert np.abs(frames[1].pixels.astype(int) - eight[1].pixels).max() <= 1
    assert len(load_dicom(bundled("examples_ybr_color.dcm"))) == 30


def test_missing_decoder_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(decoder, "_available", {})
    with pytest.raises(ImageError, match="pyjpegls") as info:
        load_dicom(bundled("MR_small_jpeg_ls_lossless.dcm"))
    assert "no decoder is installed" in str(info.value)


def test_jpeg_lossless_decodes_with_the_default_install() -> None:
    """Process 14, common in radiograph exports: python-gdcm, a base dependency, reads it."""
    lossless = load_dicom(bundled("SC_rgb_jpeg_gdcm.dcm"))[0]
    reference = load_dicom(bundled("SC_rgb_rle.dcm"))[0]
    assert np.array_equal(lossless.pixels, reference.pixels)


def test_12_bit_jpeg_names_the_gpl_extra() -> None:
    try:
        load_dicom(bundled("JPGExtended.dcm"))
    except ImageError as error:
        assert "pip install 'coheara[dicom-gpl]'" in str(error)
    else:
        pytest.skip("the GPL libjpeg plugin is installed here: 12-bit JPEG decodes")


# ---------------------------------------------------------------------- refusals and safety


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("test-SR.dcm", "structured report"),
        ("waveform_ecg.dcm", "waveform"),
        ("rtplan.dcm", "not an image"),
        ("MR_truncated.dcm", "truncated"),
        ("DICOMDIR", "DICOMDIR"),
        ("priv_SQ.dcm", "no pixel data"),
    ],
)
def test_non_images_and_broken_files_are_refused(name: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_dicom(bundled(name))


def test_no_pixel_data_sr_like_and_truncated_synthetic() -> None:
    data = synthetic(np.zeros((4, 4), dtype=np.uint8))
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(ImageError, match="no pixel data"):
        load_dicom(buffer.getvalue())
    sr = synthetic(np.zeros((4, 4), dtype=np.uint8), sop_class="1.2.840.10008.5.1.4.1.1.88.22")
    with pytest.raises(ImageError, match="structured report"):
        load_dicom(sr)
    whole = synthetic(np.zeros((64, 64), dtype=np.uint16))
    for cut in (len(whole) - 100, 140, 60):
        with pytest.raises(ImageError):
            load_image(whole[:cut])
    with pytest.raises(ImageError, match="empty"):
        load_dicom(b"")


def test_pixel_bomb_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = synthetic(np.zeros((4, 4), dtype=np.uint8))
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows, ds.Columns = 65535, 65535
    buffer = io.BytesIO()
    ds.save_as(buffer)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr(dcm, "_decode", never)
    with pytest.raises(ImageError, match=r"more than .* pixels"):
        load_dicom(buffer.getvalue())
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4, 4, limits.DEFAULT_LIMITS.max_frames + 1
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(ImageError, match="frames"):
        load_dicom(buffer.getvalue())
    ds.Rows, ds.NumberOfFrames = 0, 1
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(ImageError, match="zero size"):
        load_dicom(buffer.getvalue())


def test_burned_in_annotation_warns() -> None:
    data = synthetic(np.zeros((4, 4), dtype=np.uint8), BurnedInAnnotation="YES")
    [image] = load_dicom(data)
    assert image.provenance is not None
    assert any("burned-in" in w for w in image.provenance.warnings)
    [clean] = load_dicom(synthetic(np.zeros((4, 4), dtype=np.uint8), BurnedInAnnotation="NO"))
    assert clean.provenance is not None and clean.provenance.warnings == ()


def test_no_patient_data_in_provenance_or_errors(tmp_path: Path) -> None:
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    good = synthetic(pixels, modality="CT", RescaleIntercept=-1024, BurnedInAnnotation="YES")
    path = tmp_path / f"{CANARY}.dcm"
    path.write_bytes(good)
    texts = []
    for image in [*load_dicom(good), *load_dicom(path), load_image(path)]:
        assert image.provenance is not None
        texts.append(repr(image.provenance.to_dict()) + image.source)
    broken = [
        good[: len(good) - 10],
        synthetic(pixels, sop_class="1.2.840.10008.5.1.4.1.1.88.11"),
        synthetic(pixels, Rows=0),
    ]
    for data in broken:
        with pytest.raises(ImageError) as info:
            load_dicom(data)
        texts.append(repr(info.value.to_dict()))
    path.write_bytes(good[:200])
    for call in (lambda: load_dicom(path), lambda: load_image(path)):
        with pytest.raises(ImageError) as info:
            call()
        texts.append(repr(info.value.to_dict()))
    joined = "\n".join(texts)
    assert "CANARY" not in joined
    assert "burned-in" in joined


# -------------------------------------------------------------------------------- routing


def test_load_image_recognises_dicom_by_content(tmp_path: Path) -> None:
    expected = load_dicom(bundled("CT_small.dcm"))[0].pixels
    data = Path(bundled("CT_small.dcm")).read_bytes()
    renamed = tmp_path / "scan.png"  # the extension lies
    renamed.write_bytes(data)
    for source in (renamed, str(renamed), data, base64.b64encode(data).decode()):
        image = load_image(source)
        assert np.array_equal(image.pixels, expected)
        assert image.provenance is not None and image.provenance.recipe == "ct_windows"
    first = load_image(bundled("SC_rgb_rle_2frame.dcm"))
    assert np.array_equal(first.pixels, load_dicom(bundled("SC_rgb_rle_2frame.dcm"))[0].pixels)


def test_preamble_less_files_are_read() -> None:
    ds = pydicom.dcmread(bundled("MR_small_implicit.dcm"))
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)  # no preamble, no meta group
    bare = buffer.getvalue()
    assert bare[128:132] != b"DICM" and bare[:2] == b"\x08\x00"
    assert dcm.looks_like_dicom(bare)
    assert np.array_equal(load_image(bare).pixels, load_dicom(bundled("MR_small.dcm"))[0].pixels)
    assert not dcm.looks_like_dicom(b"\x89PNG\r\n\x1a\n" + bytes(200))


# ------------------------------------------------------------------ decode once, enhanced files


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("CT_small.dcm", {}),
        ("CT_small.dcm", {"preset": "lung"}),
        ("MR_small.dcm", {"value_range": (0.0, 5000.0)}),
        ("MR_small.dcm", {"recipe": "file_window"}),
        ("SC_rgb_rle.dcm", {}),
        ("examples_palette.dcm", {}),
        ("SC_rgb_rle_2frame.dcm", {}),
    ],
)
def test_decode_frame_then_prepare_frame_is_load_dicom(name: str, options: dict) -> None:
    """The path a volume takes (decode, keep, then the recipe) gives load_dicom's pixels."""
    ds = dcm.read_dataset(bundled(name))
    expected = load_dicom(ds, **options)
    for index, reference in enumerate(expected):
        stored, photometric = dcm.decode_frame(ds, index)
        image = dcm.prepare_frame(ds, stored, photometric=photometric, frame_index=index, **options)
        assert np.array_equal(image.pixels, reference.pixels)
        assert image.provenance == reference.provenance


def test_enhanced_frames_use_their_own_rescale_and_window() -> None:
    """pydicom's apply_modality_lut reads only the top level; each frame's groups count."""
    base = np.full((2, 8, 8), 1064, np.uint16)
    meta_groups = [
        {"PixelValueTransformationSequence": {"RescaleSlope": 1, "RescaleIntercept": -1024}},
        {"PixelValueTransformationSequence": {"RescaleSlope": 1, "RescaleIntercept": -1104}},
    ]
    data = _multiframe_enhanced(base, meta_groups)
    ds = dcm.read_dataset(data)
    from pydicom.pixels import apply_modality_lut

    assert apply_modality_lut(base[0], ds)[0, 0] == 1064  # pydicom 3 leaves it unscaled
    assert dcm.modality_values(base[0], ds, 0)[0, 0] == 40
    assert dcm.modality_values(base[1], ds, 1)[0, 0] == -40
    first, second = load_dicom(data)
    assert center(first).tolist() == [132, 128, 128]  # HU 40 in the three windows
    assert center(second).tolist() == [123, 69, 0]  # HU -40: 984/2048*255 = 122.5 -> 123
    assert not first.provenance.warnings  # type: ignore[union-attr]
    # A per-frame window (FrameVOILUTSequence) is the file's window for that frame.
    windows = [
        {"FrameVOILUTSequence": {"WindowCenter": 1064, "WindowWidth": 400}},
        {"FrameVOILUTSequence": {"WindowCenter": 1264, "WindowWidth": 400}},
    ]
    framed = load_dicom(_multiframe_enhanced(base, windows, modality="OT"))
    assert [int(center(f)[0]) for f in framed] == [128, 0]


def _multiframe_enhanced(
    frames: np.ndarray, groups: list[dict[str, dict[str, object]]], modality: str = "CT"
) -> bytes:
    per_frame = []
    for attrs in groups:
        group = Dataset()
        for macro, values in attrs.items():
            inner = Dataset()
            for key, value in values.items():
                setattr(inner, key, value)
            setattr(group, macro, [inner])
        per_frame.append(group)
    return synthetic(
        frames.reshape(-1, frames.shape[-1]),
        modality=modality,
        sop_class="1.2.840.10008.5.1.4.1.1.2.1",
        Rows=frames.shape[1],
        NumberOfFrames=frames.shape[0],
        PerFrameFunctionalGroupsSequence=per_frame,
        SharedFunctionalGroupsSequence=[Dataset()],
    )


def test_pydicom_messages_quoting_header_values_never_reach_a_terminal_or_a_log(
    capfd: pytest.CaptureFixture[str],
) -> None:
    import logging
    import warnings

    from pydicom.misc import warn_and_log

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)  # where a site's log configuration listens
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warn_and_log("Invalid value for VR CS: 'CANARY Doe'")  # as pydicom words it
    finally:
        logging.getLogger().removeHandler(handler)
    captured = capfd.readouterr()
    assert "CANARY" not in captured.out + captured.err
    assert not records
