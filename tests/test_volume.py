"""CT and MR series into ordered, sampled slices; the volume prompt; `prepare`; the CLI.

Every series is written here by pydicom, in shuffled order under misleading file names,
with pixel values that encode each slice's true anatomical index.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from coheara import model_facts  # noqa: E402
from coheara.backends.base import ChatRequest  # noqa: E402
from coheara.engine.budget import TokenEstimator, check_fits  # noqa: E402
from coheara.engine.chat_format import to_gemma_turns  # noqa: E402
from coheara.errors import ContextOverflowError, ImageError  # noqa: E402
from coheara.imaging import PreparedImage, limits, load_dicom, prepare  # noqa: E402
from coheara.imaging import dicom as dcm  # noqa: E402
from coheara.imaging import volume as vol  # noqa: E402
from coheara.imaging.volume import load_volume, volume_messages, volume_parts  # noqa: E402

CANARY = "CANARY^PATIENT"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def hu_of(index: int) -> int:
    """The Hounsfield value that encodes anatomical index `index` in a synthetic CT slice."""
    return -1000 + 10 * index


def red_of(index: int) -> int:
    """The red (-1024..1024 HU) byte a uniform slice of `hu_of(index)` becomes."""
    return int(np.round((hu_of(index) + 1024) * 255.0 / 2048.0))


def dataset(
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    series_uid: str,
    series_number: int = 3,
    position: Sequence[float] | None = None,
    orientation: Sequence[float] | None = AXIAL,
    instance: int | None = None,
) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE if modality == "CT" else MR_IMAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = CANARY
    ds.PatientID = "CANARY-ID-123"
    ds.InstitutionName = "CANARY HOSPITAL"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    if orientation is not None and position is not None:
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ct_pixels(index: int, side: int = 8) -> np.ndarray:
    return np.full((side, side), hu_of(index) + 1024, dtype=np.uint16)


def write_series(
    folder: Path,
    count: int,
    *,
    modality: str = "CT",
    series_number: int = 3,
    positions: Sequence[Sequence[float] | None] | None = None,
    orientation: Sequence[float] | None = AXIAL,
    instances: Sequence[int | None] | None = None,
    pixels: Sequence[np.ndarray] | None = None,
    seed: int = 7,
    prefix: str = "",
) -> list[Path]:
    """Slice k (anatomical index) at `positions[k]`, written shuffled, named misleadingly.

    Returns the paths indexed by anatomical index.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    if positions is None:
        positions = [(0.0, 0.0, 2.5 * k) for k in range(count)]
    order = list(range(count))
    random.Random(seed).shuffle(order)
    paths: dict[int, Path] = {}
    for rank, k in enumerate(order):
        # The file name counts down against the anatomy: sorting names gives reversed order.
        path = folder / f"{prefix}IM{count - k:04d}_{rank:03d}.dcm"
        path.write_bytes(
            dataset(
                pixels[k] if pixels is not None else ct_pixels(k),
                modality=modality,
                series_uid=uid,
                series_number=series_number,
                position=positions[k],
                orientation=orientation,
                instance=(instances[k] if instances is not None else rank + 1),
            )
        )
        paths[k] = path
    return [paths[k] for k in range(count)]


def reds(images: Sequence[PreparedImage]) -> list[int]:
    return [int(image.pixels[448, 448, 0]) for image in images]


def assert_no_canary(*texts: object) -> None:
    for text in texts:
        assert "CANARY" not in str(text)


# ----- order --------------------------------------------------------------------------------


def test_axial_series_is_ordered_by_position_not_file_name_or_instance(tmp_path: Path) -> None:
    write_series(tmp_path, 12)
    volume = load_volume(tmp_path)
    assert volume.ordered_by == "position" and volume.modality == "CT"
    assert reds(volume.slices) == [red_of(k) for k in range(12)]
    assert volume.positions == tuple(2.5 * k for k in range(12))
    first = volume.slices[0].provenance
    last = volume.slices[-1].provenance
    assert isinstance(first, vol.SliceProvenance) and isinstance(last, vol.SliceProvenance)
    assert (first.slice_number, first.order_index, first.position) == (1, 0, 0.0)
    assert (last.slice_number, last.order_index, last.position) == (12, 11, 27.5)
    assert first.recipe == "ct_windows" and last.series_slices == 12
    assert volume.warnings == ()
    assert_no_canary(volume.summary(), [s.provenance for s in volume.slices])


def test_oblique_series_is_ordered_along_the_normal_where_z_alone_is_wrong(
    tmp_path: Path,
) -> None:
    s, c = 0.8, 0.6
    orientation = (1.0, 0.0, 0.0, 0.0, c, -s)  # row x column = (0, s, c)
    normal = np.array([0.0, s, c])
    column = np.array([0.0, c, -s])
    positions = [tuple(2.0 * k * normal + 30.0 * (-1) ** k * column) for k in range(10)]
    z_order = sorted(range(10), key=lambda k: positions[k][2])
    assert z_order != list(range(10))  # sorting by z alone would scramble the anatomy
    write_series(tmp_path, 10, positions=positions, orientation=orientation)
    volume = load_volume(tmp_path)
    assert reds(volume.slices) == [red_of(k) for k in range(10)]
    assert volume.positions == pytest.approx([2.0 * k for k in range(10)], abs=1e-3)


def test_missing_positions_fall_back_to_instance_number_with_a_warning(tmp_path: Path) -> None:
    write_series(tmp_path, 8, positions=[None] * 8, instances=[k + 1 for k in range(8)], seed=3)
    volume = load_volume(tmp_path)
    assert volume.ordered_by == "instance_number"
    assert reds(volume.slices) == [red_of(k) for k in range(8)]
    assert any("ordered by InstanceNumber" in w for w in volume.warnings)
    assert volume.positions == (None,) * 8


def test_no_position_and_no_instance_number_is_refused(tmp_path: Path) -> None:
    write_series(tmp_path, 3, positions=[None] * 3, instances=[None] * 3)
    with pytest.raises(ImageError, match="order is unknown"):
        load_volume(tmp_path)


def test_duplicate_positions_keep_the_lowest_instance_number_whatever_the_file_order(
    tmp_path: Path,
) -> None:
    positions = [(0.0, 0.0, 0.0), (0.0, 0.0, 5.0), (0.0, 0.0, 5.0), (0.0, 0.0, 10.0)]
    pixels = [ct_pixels(0), ct_pixels(1), ct_pixels(50), ct_pixels(2)]
    results = []
    for seed in (1, 2, 3):
        folder = tmp_path / f"s{seed}"
        write_series(
            folder, 4, positions=positions, pixels=pixels, instances=[1, 2, 3, 4], seed=seed
        )
        volume = load_volume(folder)
        results.append(reds(volume.slices))
        assert volume.series_slices == 3
        assert any("1 slice(s) at an already seen position dropped" in w for w in volume.warnings)
    assert results == [[red_of(0), red_of(1), red_of(2)]] * 3


def test_a_gap_in_the_series_warns_of_uneven_spacing(tmp_path: Path) -> None:
    z = [0.0, 2.0, 4.0, 6.0, 12.0, 14.0]
    write_series(tmp_path, 6, positions=[(0.0, 0.0, v) for v in z])
    volume = load_volume(tmp_path)
    assert any("uneven slice spacing" in w and "6.00" in w for w in volume.warnings)


# ----- one series only, no patient data --------------------------------------------------


def test_mixed_series_are_refused_with_counts_and_without_patient_data(tmp_path: Path) -> None:
    write_series(tmp_path, 5, series_number=3, prefix="a")
    write_series(
        tmp_path,
        4,
        modality="MR",
        series_number=7,
        prefix="b",
        pixels=[np.full((8, 8), k, np.uint16) for k in range(4)],
    )
    with pytest.raises(ImageError) as caught:
        load_volume(tmp_path)
    message = str(caught.value)
    assert "mixes 2 series" in message
    assert "series 3 (CT, 5)" in message and "series 7 (MR, 4)" in message
    assert_no_canary(message, caught.value.to_dict())
    assert "IM0" not in message  # no file names either


# ----- sampling -----------------------------------------------------------------------------


def test_200_slices_are_sampled_evenly_to_85_keeping_first_and_last(tmp_path: Path) -> None:
    write_series(tmp_path, 200)
    volume = load_volume(tmp_path)
    assert len(volume.slices) == 85 and volume.series_slices == 200
    assert volume.sampled[0] == 0 and volume.sampled[-1] == 199
    gaps = np.diff(volume.sampled)
    assert set(gaps.tolist()) <= {2, 3} and gaps.max() - gaps.min() <= 1
    assert reds(volume.slices) == [red_of(k) for k in volume.sampled]
    assert [s.provenance.order_index for s in volume.slices] == list(volume.sampled)
    assert any("200 slices sampled evenly to 85" in w for w in volume.warnings)


def test_sampling_is_configurable() -> None:
    assert vol.sample_evenly(10, 4) == [0, 3, 6, 9]
    assert vol.sample_evenly(3, 85) == [0, 1, 2]
    assert vol.sample_evenly(9, 1) == [4]


# ----- recipes ------------------------------------------------------------------------------


def test_mr_volume_uses_one_min_max_so_a_dark_slice_stays_dark(tmp_path: Path) -> None:
    ramp = np.linspace(0, 50, 64).reshape(8, 8)
    pixels = [np.round(ramp + 100 * k).astype(np.uint16) for k in range(3)]
    write_series(tmp_path, 3, modality="MR", pixels=pixels)
    volume = load_volume(tmp_path)
    assert volume.recipe == "min_max" and volume.value_range == (0.0, 250.0)
    dark, middle, bright = (s.pixels for s in volume.slices)
    assert dark.max() <= round(50 * 255 / 250) and bright.min() >= round(200 * 255 / 250)
    assert dark.max() < middle.min() and middle.max() < bright.min()
    assert np.array_equal(dark[..., 0], dark[..., 2])  # the same value in R, G and B
    # Each slice alone would have been stretched to the full range.
    alone = load_dicom(sorted(tmp_path.iterdir())[0])[0].pixels
    assert alone.max() == 255 and alone.min() == 0


def test_ct_slices_equal_the_single_file_recipe_and_presets_pass_through(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(5)
    pixels = [rng.integers(0, 2400, (16, 12)).astype(np.uint16) for _ in range(4)]
    paths = write_series(tmp_path, 4, pixels=pixels)
    volume = load_volume(tmp_path)
    lung = load_volume(tmp_path, preset="lung")
    for k, path in enumerate(paths):
        assert np.array_equal(volume.slices[k].pixels, load_dicom(path)[0].pixels)
        assert np.array_equal(lung.slices[k].pixels, load_dicom(path, preset="lung")[0].pixels)
    assert lung.slices[0].provenance.preset == "lung"


# ----- inputs and limits ----------------------------------------------------------------------


def test_non_dicom_files_in_the_folder_are_skipped_and_counted(tmp_path: Path) -> None:
    write_series(tmp_path, 4)
    (tmp_path / "README.txt").write_text("scanned by CANARY")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "thumb.png")
    volume = load_volume(tmp_path)
    assert volume.skipped_files == 2 and len(volume.slices) == 4
    assert "2 file(s) in the folder skipped: not DICOM images" in volume.warnings


def test_a_list_of_files_or_bytes_is_a_series_but_must_be_all_dicom(tmp_path: Path) -> None:
    paths = write_series(tmp_path, 5)
    shuffled = [paths[k] for k in (3, 0, 4, 1, 2)]
    assert reds(load_volume(shuffled).slices) == [red_of(k) for k in range(5)]
    as_bytes = [p.read_bytes() for p in shuffled]
    assert reds(load_volume(as_bytes).slices) == [red_of(k) for k in range(5)]
    with pytest.raises(ImageError, match="item 2 is not DICOM"):
        load_volume([paths[0], b"not dicom at all", paths[1]])


def test_too_many_files_are_refused_before_anything_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_series(tmp_path, 6)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("read or decoded despite the limit")

    monkeypatch.setattr(dcm, "_decode", never)
    monkeypatch.setattr(vol.pydicom, "dcmread", never)
    with pytest.raises(ImageError, match="more than 5 files"):
        load_volume(tmp_path, max_files=5)
    with pytest.raises(ImageError, match="more than 5 files"):
        load_volume(sorted(tmp_path.iterdir()), max_files=5)


def test_too_many_pixels_are_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_series(tmp_path, 6)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded despite the limit")

    monkeypatch.setattr(dcm, "_decode", never)
    with pytest.raises(ImageError, match="more than 300 pixels in all"):
        load_volume(tmp_path, max_pixels=300)  # 6 x 64 = 384 pixels


# ----- the prompt ---------------------------------------------------------------------------


def test_volume_parts_follow_the_notebook_order() -> None:
    images = [PreparedImage(np.full((896, 896, 3), k, np.uint8)) for k in range(3)]
    parts = volume_parts("Look carefully.", images, "What is wrong?")
    assert parts[0] == "Look carefully." and parts[-1] == "What is wrong?"
    assert parts[1:-1] == [images[0], "SLICE 1", images[1], "SLICE 2", images[2], "SLICE 3"]


def test_volume_messages_put_the_instruction_first_and_the_question_last(
    tmp_path: Path,
) -> None:
    write_series(tmp_path, 5)
    volume = load_volume(tmp_path)
    turns = to_gemma_turns(volume_messages("Is there a bleed?", volume))
    assert len(turns) == 1
    turn = turns[0]
    parts = turn.parts
    assert isinstance(parts[0], str) and parts[0].startswith("You are reviewing 5 consecutive CT")
    assert parts[1:-1] == tuple(
        p for n, image in enumerate(volume.slices, 1) for p in (image, f"SLICE {n}")
    )
    assert parts[-1] == "Is there a bleed?"
    assert turn.images == volume.slices  # what a runtime that cannot interleave gets
    assert turn.text.endswith("SLICE 5\nIs there a bleed?")
    assert_no_canary(turn.folded_text)


def test_the_budget_counts_every_slice_and_refuses_a_small_window() -> None:
    image = PreparedImage(np.zeros((896, 896, 3), np.uint8))
    turns = to_gemma_turns(volume_messages("Findings?", [image] * 85))
    size = TokenEstimator().measure(ChatRequest(turns), None)
    assert size.images == 85
    assert size.tokens >= 85 * model_facts.IMAGE_PROMPT_TOKENS
    check_fits(size, 1024, 32_768)
    with pytest.raises(ContextOverflowError, match="85 image"):
        check_fits(size, 1024, 16_384)


# ----- prepare ------------------------------------------------------------------------------


def test_prepare_routes_each_kind_of_input(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "series", 4)
    picture = tmp_path / "photo.png"
    Image.fromarray(np.full((10, 20, 3), 77, np.uint8)).save(picture)

    folder = prepare(tmp_path / "series")
    assert folder.kind == "volume" and reds(folder.images) == [red_of(k) for k in range(4)]
    listed = prepare([str(p) for p in reversed(paths)])
    assert listed.kind == "volume" and reds(listed.images) == [red_of(k) for k in range(4)]
    one = prepare(paths[2])
    assert one.kind == "dicom" and reds(one.images) == [red_of(2)]
    raw = prepare(paths[1].read_bytes(), preset="bone")
    assert raw.kind == "dicom" and raw.images[0].provenance.preset == "bone"
    photo = prepare(picture)
    assert photo.kind == "image" and int(photo.images[0].pixels[0, 0, 0]) == 77
    assert prepare([picture, picture]).kind == "images"
    with pytest.raises(ImageError, match="mixed"):
        prepare([paths[0], picture])
    with pytest.raises(ImageError, match="DICOM input only"):
        prepare(picture, preset="lung")
    summary = folder.summary()
    assert summary["kind"] == "volume" and summary["series_slices"] == 4
    assert_no_canary(json.dumps(summary, default=str))


# ----- the CLI ------------------------------------------------------------------------------


def test_cli_ask_accepts_a_folder_and_counts_every_slice(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    write_series(tmp_path / "series", 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHEARA_", "OLLAMA_"))}
    env.update({"HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "NO_COLOR": "1"})
    common = ["--max-tokens", "2", "--json", "--backend", "transformers"]
    common += ["--model", str(tiny_model_dir)]

    def ask(*extra: str) -> dict[str, object]:
        result = subprocess.run(
            [sys.executable, "-m", "coheara.cli.main", "ask", *extra, *common],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        assert_no_canary(result.stdout, result.stderr)
        return dict(json.loads(result.stdout))

    folder = tmp_path / "series"
    volume = load_volume(folder)
    # The same texts without the slices: the instruction, the labels, the question.
    labels = " ".join(f"SLICE {n}" for n in range(1, 4))
    text_only = ask(f"{vol.default_instruction(volume)} {labels} Describe.")
    seen = ask("Describe.", "--image", str(folder))
    assert text_only["prompt_tokens_exact"] is True and seen["prompt_tokens_exact"] is True
    grown = int(seen["prompt_tokens"]) - int(text_only["prompt_tokens"])  # type: ignore[call-overload]
    # Each slice costs its 260 tokens; the labels' joins tokenize a little differently.
    assert (
        3 * model_facts.IMAGE_PROMPT_TOKENS - 8 <= grown <= 3 * model_facts.IMAGE_PROMPT_TOKENS + 8
    )


# ----- one multi-frame file as a volume -------------------------------------------------------

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
CT_WINDOWS = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))


def ct_rgb(hu: float) -> list[int]:
    """The (R, G, B) bytes of a uniform slice of `hu` under Google's three CT windows."""
    return [int(np.round((np.clip(hu, lo, hi) - lo) * 255.0 / (hi - lo))) for lo, hi in CT_WINDOWS]


def rgb_at_center(image: PreparedImage) -> list[int]:
    return [int(v) for v in image.pixels[448, 448]]


def item(**attrs: object) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def multiframe(
    frames: Sequence[np.ndarray],
    *,
    modality: str = "CT",
    positions: Sequence[Sequence[float]] | None = None,
    orientation: Sequence[float] = AXIAL,
    orientation_per_frame: bool = False,
    rescales: Sequence[tuple[float, float]] | None = None,
    shared_rescale: tuple[float, float] | None = (1.0, -1024.0),
    enhanced: bool = True,
    increment: tuple[str, Sequence[float]] | None = None,
    series_uid: str | None = None,
) -> bytes:
    """One multi-frame file, frames stored in the order given (tests shuffle them).

    Enhanced: positions per frame in PerFrameFunctionalGroupsSequence, orientation shared
    (or per frame), rescale per frame or shared as (slope, intercept) (a CT's default: the
    shared -1024 of `ct_pixels`, unless `rescales` are given). Legacy: top-level
    rescale, and `increment` = (keyword, values) named by FrameIncrementPointer.
    """
    meta = FileMetaDataset()
    if enhanced:
        sop = ENHANCED_CT if modality == "CT" else ENHANCED_MR
    else:
        sop = CT_IMAGE if modality == "CT" else MR_IMAGE
    meta.MediaStorageSOPClassUID = UID(sop)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = CANARY
    ds.PatientID = "CANARY-ID-123"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = 5
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames[0].shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    iop = [f"{v:.6f}" for v in orientation]
    if enhanced:
        shared = Dataset()
        if not orientation_per_frame:
            shared.PlaneOrientationSequence = [item(ImageOrientationPatient=iop)]
        if shared_rescale is not None and modality == "CT" and rescales is None:
            slope, intercept = shared_rescale
            shared.PixelValueTransformationSequence = [
                item(RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="HU")
            ]
        ds.SharedFunctionalGroupsSequence = [shared]
        per_frame = []
        for k in range(len(frames)):
            group = Dataset()
            if positions is not None:
                ipp = [f"{v:.4f}" for v in positions[k]]
                group.PlanePositionSequence = [item(ImagePositionPatient=ipp)]
            if orientation_per_frame:
                group.PlaneOrientationSequence = [item(ImageOrientationPatient=iop)]
            if rescales is not None:
                slope, intercept = rescales[k]
                group.PixelValueTransformationSequence = [
                    item(RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="HU")
                ]
            per_frame.append(group)
        ds.PerFrameFunctionalGroupsSequence = per_frame
    else:
        if modality == "CT":
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
        ds.ImagePositionPatient = ["0", "0", "0"]
        ds.ImageOrientationPatient = iop
        if increment is not None:
            keyword, values = increment
            ds.FrameIncrementPointer = pydicom.datadict.tag_for_keyword(keyword)
            setattr(ds, keyword, [f"{v:.4f}" for v in values])
    stack = np.stack([np.asarray(f, dtype=np.uint16) for f in frames])
    ds.PixelData = np.ascontiguousarray(stack).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def shuffled(count: int, seed: int = 11) -> list[int]:
    """stored[j] = the anatomical index of frame j: never the identity."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    assert order != sorted(order)
    return order


HUS = [-1000, -500, -100, 0, 20, 40, 60, 100, 300, 1000]
"""Anatomical index k has this uniform HU: every CT window channel tells them apart."""


def test_ct_rgb_helper_matches_the_notebook_formula() -> None:
    assert ct_rgb(40) == [
        round((40 + 1024) * 255 / 2048),
        round((40 + 135) * 255 / 350),
        round(40 * 255 / 80),
    ]
    assert ct_rgb(40) == [132, 128, 128] and ct_rgb(-2000) == [0, 0, 0]


@pytest.mark.parametrize("where", ["per_frame", "shared"])
def test_enhanced_ct_frames_follow_positions_with_each_frames_hounsfield_units(
    where: str, tmp_path: Path
) -> None:
    stored = shuffled(len(HUS))
    # Frame j holds anatomical slice stored[j]: its HU through that frame's own rescale.
    if where == "per_frame":
        rescales = [(1.0, -1024.0) if j % 2 else (2.0, -2048.0) for j in range(len(HUS))]
    else:
        rescales = [(2.0, -2048.0)] * len(HUS)
    frames = [
        np.full((8, 8), (HUS[k] - rescales[j][1]) / rescales[j][0], np.uint16)
        for j, k in enumerate(stored)
    ]
    data = multiframe(
        frames,
        positions=[(0.0, 0.0, 2.5 * k) for k in stored],
        orientation_per_frame=where == "per_frame",
        rescales=rescales if where == "per_frame" else None,
        shared_rescale=rescales[0],
    )
    path = tmp_path / "enhanced.dcm"
    path.write_bytes(data)
    for source in (path, str(path), data, [path], tmp_path):
        volume = load_volume(source)  # type: ignore[arg-type]
        assert volume.ordered_by == "position" and volume.modality == "CT"
        assert [rgb_at_center(s) for s in volume.slices] == [ct_rgb(hu) for hu in HUS]
        assert volume.positions == tuple(2.5 * k for k in range(len(HUS)))
        assert volume.recipe == "ct_windows" and volume.warnings == ()
    first = volume.slices[0].provenance
    assert isinstance(first, vol.SliceProvenance)
    assert first.frame_index == stored.index(0) and first.frames == len(HUS)
    assert (first.slice_number, first.order_index, first.instance_number) == (1, 0, None)
    # The same summary as for a series, and no patient data in it.
    paths = write_series(tmp_path / "series", 3)
    assert volume.summary().keys() == load_volume(paths[0].parent).summary().keys()
    assert_no_canary(json.dumps(volume.summary()), [s.provenance for s in volume.slices])
    # load_dicom on the same file now reads each frame's rescale too (file order).
    frames_alone = load_dicom(data)
    assert [rgb_at_center(f) for f in frames_alone] == [ct_rgb(HUS[k]) for k in stored]


def test_is_multiframe_volume_for_datasets_paths_and_bytes(tmp_path: Path) -> None:
    ct = multiframe([ct_pixels(k) for k in range(3)], positions=[(0, 0, k) for k in range(3)])
    mr = multiframe([np.zeros((8, 8))] * 2, modality="MR", enhanced=False)
    one = multiframe([ct_pixels(0)], positions=[(0, 0, 0)])
    path = tmp_path / "ct.dcm"
    path.write_bytes(ct)
    assert vol.is_multiframe_volume(ct) and vol.is_multiframe_volume(mr)
    assert vol.is_multiframe_volume(path) and vol.is_multiframe_volume(str(path))
    assert vol.is_multiframe_volume(dcm.read_dataset(ct))
    assert not vol.is_multiframe_volume(one)  # one frame
    single = write_series(tmp_path / "s", 1)[0]
    assert not vol.is_multiframe_volume(single)  # single-frame CT
    assert not vol.is_multiframe_volume(tmp_path)  # a folder
    assert not vol.is_multiframe_volume(b"not dicom")
    assert not vol.is_multiframe_volume(ct[:300])  # truncated header: not routed, never raises
    rgb = get_rgb_multiframe()
    assert not vol.is_multiframe_volume(rgb)  # an RGB secondary capture (OT)


def get_rgb_multiframe() -> bytes:
    from pydicom.data import get_testdata_file

    name = get_testdata_file("SC_rgb_rle_2frame.dcm", download=False)
    if name is None:
        pytest.skip("SC_rgb_rle_2frame.dcm is not bundled with this pydicom")
    return Path(str(name)).read_bytes()


def counting_decode(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """Record the frame index of every decode call (None: the file's only frame)."""
    calls: list[int | None] = []
    original = dcm._decode

    def counted(ds: Dataset, index: int | None) -> tuple[np.ndarray, str]:
        calls.append(index)
        return original(ds, index)

    monkeypatch.setattr(dcm, "_decode", counted)
    return calls


def test_multiframe_is_sampled_keeping_first_and_last_and_only_sampled_frames_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    count = 40
    stored = shuffled(count, seed=4)
    frames = [ct_pixels(k) for k in stored]
    data = multiframe(frames, positions=[(0.0, 0.0, -3.0 * k) for k in stored])
    calls = counting_decode(monkeypatch)
    volume = load_volume(data, max_slices=7)
    assert volume.sampled == tuple(vol.sample_evenly(count, 7)) == (0, 6, 13, 20, 26, 32, 39)
    # Positions decrease with k, so the anatomical order (ascending along the normal) is
    # k = 39 ... 0: slice n is k = 39 - sampled[n].
    assert reds(volume.slices) == [red_of(count - 1 - i) for i in volume.sampled]
    assert volume.positions[0] == -117.0 and volume.positions[-1] == 0.0
    expected_frames = sorted(stored.index(count - 1 - i) for i in volume.sampled)
    assert sorted(c for c in calls if c is not None) == expected_frames and len(calls) == 7
    assert [s.provenance.frame_index for s in volume.slices] == [
        stored.index(count - 1 - i) for i in volume.sampled
    ]
    assert any(f"{count} slices sampled evenly to 7" in w for w in volume.warnings)


def test_multiframe_mr_is_one_min_max_over_the_volume_and_decoded_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ramp = np.linspace(0, 50, 64).reshape(8, 8)
    stored = [2, 0, 1]
    frames = [np.round(ramp + 100 * k).astype(np.uint16) for k in stored]
    data = multiframe(frames, modality="MR", positions=[(0.0, 0.0, 4.0 * k) for k in stored])
    calls = counting_decode(monkeypatch)
    volume = load_volume(data)
    assert len(calls) == 3  # each frame once: the range and the recipe share the decode
    assert volume.recipe == "min_max" and volume.value_range == (0.0, 250.0)
    dark, middle, bright = (s.pixels for s in volume.slices)
    assert dark.max() <= round(50 * 255 / 250) and bright.min() >= round(200 * 255 / 250)
    assert dark.max() < middle.min() and middle.max() < bright.min()
    assert np.array_equal(dark[..., 0], dark[..., 1])
    # load_dicom min-maxes each frame alone: the dark frame would be stretched to 255.
    alone = load_dicom(data)[stored.index(0)].pixels
    assert alone.max() == 255


def test_multiframe_without_positions_is_in_frame_order_with_a_warning() -> None:
    data = multiframe([ct_pixels(k) for k in (4, 1, 3)], enhanced=False)
    volume = load_volume(data)
    assert volume.ordered_by == "frame" and volume.positions == (None, None, None)
    assert reds(volume.slices) == [red_of(4), red_of(1), red_of(3)]
    assert any("ordered by frame number" in w for w in volume.warnings)


@pytest.mark.parametrize("keyword", ["GridFrameOffsetVector", "SliceLocation"])
def test_legacy_multiframe_follows_a_spatial_frame_increment(keyword: str) -> None:
    stored = shuffled(6, seed=2)
    offsets = [5.0 * k for k in stored]
    if keyword == "GridFrameOffsetVector":  # relative to the first frame: starts at 0
        offsets = [o - offsets[0] for o in offsets]
    data = multiframe([ct_pixels(k) for k in stored], enhanced=False, increment=(keyword, offsets))
    volume = load_volume(data)
    assert volume.ordered_by == "position"
    assert reds(volume.slices) == [red_of(k) for k in range(6)]
    assert np.allclose(np.diff(volume.positions), 5.0)  # type: ignore[arg-type]


def test_multiframe_frames_at_one_position_stay_in_frame_order_with_a_warning() -> None:
    data = multiframe([ct_pixels(k) for k in (2, 0, 1)], positions=[(0.0, 0.0, 7.0)] * 3)
    volume = load_volume(data)
    assert volume.ordered_by == "frame" and len(volume.slices) == 3
    assert reds(volume.slices) == [red_of(2), red_of(0), red_of(1)]
    assert any("share one position" in w for w in volume.warnings)


def test_two_echoes_at_each_position_keep_the_first_frame_with_a_warning() -> None:
    # Frames: position 1 echo A, position 0 echo A, position 1 echo B, position 0 echo B.
    data = multiframe(
        [ct_pixels(k) for k in (1, 0, 11, 10)],
        positions=[(0.0, 0.0, z) for z in (3.0, 0.0, 3.0, 0.0)],
    )
    volume = load_volume(data)
    assert reds(volume.slices) == [red_of(0), red_of(1)]
    assert any("2 frame(s) at an already seen position dropped" in w for w in volume.warnings)


def test_a_multiframe_file_over_the_frame_limit_is_refused_before_ordering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = multiframe([ct_pixels(k) for k in range(6)], positions=[(0, 0, k) for k in range(6)])

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("ordered or decoded despite the limit")

    monkeypatch.setattr(vol, "_frame_positions", never)
    monkeypatch.setattr(dcm, "_decode", never)
    with (
        limits.applied(limits.ImageLimits(max_frames=5)),
        pytest.raises(ImageError, match="more than 5 frames"),
    ):
        load_volume(data)


def test_a_multiframe_file_among_other_files_is_still_refused(tmp_path: Path) -> None:
    paths = write_series(tmp_path, 2)
    uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    data = multiframe([ct_pixels(0)] * 2, positions=[(0, 0, 0), (0, 0, 1)], series_uid=uid)
    with pytest.raises(ImageError, match="multi-frame file inside a series"):
        load_volume([data, *paths])


# ----- folders: a DICOM CD or export --------------------------------------------------------


def write_cd(root: Path, series: Sequence[list[Path]]) -> None:
    """A DICOM CD as pydicom's FileSet writes it: DICOMDIR at the top, PT/ST/SE/IM below."""
    from pydicom.fileset import FileSet

    fileset = FileSet()
    for paths in series:
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
            ds.StudyDate, ds.StudyTime, ds.StudyID = "20200101", "120000", "1"
            ds.AccessionNumber = ""
            fileset.add(ds)
    fileset.write(root)


def test_a_dicom_cd_with_a_dicomdir_and_subfolders_is_one_volume(tmp_path: Path) -> None:
    write_cd(tmp_path / "cd", [write_series(tmp_path / "src", 7)])
    assert (tmp_path / "cd" / "DICOMDIR").is_file()
    assert not any(p.suffix for p in (tmp_path / "cd").rglob("IM*"))  # in subfolders, bare
    (tmp_path / "cd" / ".DS_Store").write_bytes(b"hidden")
    volume = load_volume(tmp_path / "cd")
    assert reds(volume.slices) == [red_of(k) for k in range(7)]
    assert volume.skipped_files == 0 and volume.warnings == ()


def test_a_cd_of_several_series_names_them_and_says_to_pass_one_folder(tmp_path: Path) -> None:
    mr = [np.full((8, 8), k, np.uint16) for k in range(2)]
    write_cd(
        tmp_path / "cd",
        [
            write_series(tmp_path / "a", 3, series_number=2),
            write_series(tmp_path / "b", 2, modality="MR", series_number=4, pixels=mr),
        ],
    )
    with pytest.raises(ImageError) as caught:
        load_volume(tmp_path / "cd")
    message = str(caught.value)
    assert "series 2 (CT, 3)" in message and "series 4 (MR, 2)" in message
    assert "pass one series' folder" in message
    assert_no_canary(message)
    assert "SE0" not in message and "IM0" not in message  # no file or folder names


def test_a_nested_folder_over_the_file_limit_is_refused_before_any_header_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(3):
        write_series(tmp_path / "DICOM" / f"SE{n}", 2)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("read despite the limit")

    monkeypatch.setattr(vol.pydicom, "dcmread", never)
    monkeypatch.setattr(vol, "_read_header", never)
    with (
        limits.applied(limits.ImageLimits(max_series_files=5)),
        pytest.raises(ImageError, match="more than 5 files"),
    ):
        load_volume(tmp_path)


def test_folder_depth_is_limited_and_symlinks_are_not_followed(tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    write_series(deep.joinpath(*[f"d{n}" for n in range(vol.MAX_FOLDER_DEPTH + 1)]), 2)
    with pytest.raises(ImageError, match="nests more than 8 levels"):
        load_volume(deep)
    write_series(deep.joinpath(*[f"d{n}" for n in range(vol.MAX_FOLDER_DEPTH)]), 2, prefix="z")
    shallow = tmp_path / "shallow"
    write_series(shallow.joinpath(*[f"d{n}" for n in range(vol.MAX_FOLDER_DEPTH)]), 2)
    assert len(load_volume(shallow).slices) == 2  # 8 levels are walked
    # Links, to a folder or a file outside, are not followed.
    series = tmp_path / "series"
    write_series(series, 3)
    outside = write_series(tmp_path / "outside", 2, series_number=9)
    try:
        (series / "linked").symlink_to(outside[0].parent, target_is_directory=True)
        (series / "linked.dcm").symlink_to(outside[1])
    except OSError:
        pytest.skip("symbolic links cannot be made here")
    volume = load_volume(series)
    assert len(volume.slices) == 3 and reds(volume.slices) == [red_of(k) for k in range(3)]
    assert "2 symbolic link(s) in the folder not followed" in volume.warnings


# ----- corrupt files and decode counts --------------------------------------------------------


def test_a_corrupt_file_in_a_series_is_a_clear_error(tmp_path: Path) -> None:
    paths = write_series(tmp_path, 5)
    good = [p.read_bytes() for p in paths]
    broken_header = good[2][:200]
    cut = good[2][: len(good[2]) - 40]  # pixel data cut short: the header still reads
    with pytest.raises(ImageError, match=r"^series item 3: DICOM data is truncated or corrupt"):
        load_volume([*good[:2], broken_header, *good[3:]])
    with pytest.raises(ImageError, match=r"^series item 3: DICOM pixel data is truncated"):
        load_volume([*good[:2], cut, *good[3:]])
    sorted_paths = sorted(tmp_path.iterdir())
    sorted_paths[1].write_bytes(sorted_paths[1].read_bytes()[:200])
    with pytest.raises(ImageError) as caught:
        load_volume(tmp_path)
    assert str(caught.value) == (
        "file 2 of 5 in the folder (in path order): DICOM data is truncated or corrupt "
        "(the header stops before the pixel data)"
    )
    assert_no_canary(str(caught.value))


def test_a_series_of_bytes_decodes_each_sampled_mr_slice_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pixels = [np.full((8, 8), 10 * k, np.uint16) for k in range(10)]
    paths = write_series(tmp_path, 10, modality="MR", pixels=pixels)
    calls = counting_decode(monkeypatch)
    volume = load_volume([p.read_bytes() for p in reversed(paths)], max_slices=4)
    assert calls == [None] * 4  # the sampled slices, once each
    assert volume.value_range == (0.0, 90.0)
    assert [int(s.pixels[0, 0, 0]) for s in volume.slices] == [0, 85, 170, 255]


def test_prepare_makes_a_volume_of_a_multi_frame_ct_file(tmp_path: Path) -> None:
    stored = shuffled(6)
    data = multiframe(
        [ct_pixels(k) for k in stored], positions=[(0.0, 0.0, 2.0 * k) for k in stored]
    )
    prepared = prepare(data)
    assert prepared.kind == "volume" and prepared.labels()[0] == "SLICE 1"
    assert reds(prepared.images) == [red_of(k) for k in range(6)]
    path = tmp_path / "enhanced.dcm"
    path.write_bytes(data)
    assert reds(prepare(path, max_slices=2).images) == [red_of(0), red_of(5)]
    single = multiframe([ct_pixels(1)], positions=[(0.0, 0.0, 0.0)])
    assert prepare(single).kind == "dicom"  # one frame is one image, not a volume
