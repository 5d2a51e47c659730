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
from coheara.imaging import PreparedImage, load_dicom, prepare  # noqa: E402
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
