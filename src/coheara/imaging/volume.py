"""A CT or MR series (a folder, or a list of files or bytes) into ordered, sampled slices.

The recipe of Google's MedGemma notebooks (DESIGN.md section 1):

- one series only; slices ordered by their position along the slice normal
  (ImagePositionPatient projected on the cross product of ImageOrientationPatient's row
  and column vectors), InstanceNumber only as a fallback, with a warning;
- sampled evenly to at most 85 slices, the first and the last kept;
- CT: the three-window RGB on each slice (or a preset or window passed through);
  MR: ONE min-max over the whole sampled volume, so a dark slice stays dark;
- the prompt: the instruction, then each slice followed by `SLICE n`, the question last.

Headers are read first (`stop_before_pixels`); every limit (file count, pixels in all)
is checked before any pixel is decoded. Errors and warnings never carry patient data:
only counts, series numbers, modality codes and positions.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from coheara.errors import ImageError
from coheara.imaging import dicom as _dicom
from coheara.imaging import limits
from coheara.imaging.image import PreparedImage, Provenance

DEFAULT_MAX_SLICES = 85
"""Most slices sent to the model, as in Google's CT and MRI notebooks."""

_POSITION_DECIMALS = 3
"""Positions equal to a micrometre are the same position (a duplicate slice)."""

VolumeSource = str | Path | Sequence[str | Path | bytes | bytearray | memoryview]


@dataclass(frozen=True)
class SliceProvenance(Provenance):
    """A slice's provenance plus where it sits in the series (non-identifying)."""

    slice_number: int = 0
    """1-based number in the sampled volume: the `SLICE n` label."""
    order_index: int = 0
    """0-based index in the whole ordered series, before sampling."""
    series_slices: int = 0
    position: float | None = None
    """Millimetres along the slice normal (None when ordered by InstanceNumber)."""
    instance_number: int | None = None


@dataclass(frozen=True, eq=False)
class Volume:
    """Prepared slices in anatomical order, with what was done and what to watch."""

    slices: tuple[PreparedImage, ...]
    modality: str | None
    recipe: str
    ordered_by: str
    """"position" (along the slice normal) or "instance_number" (fallback)."""
    series_slices: int
    """Slices of the series after duplicates were dropped, before sampling."""
    sampled: tuple[int, ...]
    """Indices into the ordered series of the slices kept."""
    positions: tuple[float | None, ...]
    """Position of each kept slice along the normal, in mm."""
    value_range: tuple[float, float] | None
    skipped_files: int
    warnings: tuple[str, ...]

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "volume",
            "modality": self.modality,
            "recipe": self.recipe,
            "ordered_by": self.ordered_by,
            "series_slices": self.series_slices,
            "slices": len(self.slices),
            "sampled": list(self.sampled),
            "positions": list(self.positions),
            "value_range": list(self.value_range) if self.value_range else None,
            "skipped_files": self.skipped_files,
            "warnings": list(self.warnings),
        }


@dataclass
class _Header:
    """One file's header; `ref` is how to read it again (a path or the bytes)."""

    ref: Path | bytes
    input_index: int
    ds: Dataset


# ---------------------------------------------------------------------------- gathering


def _inputs(source: VolumeSource, max_files: int) -> tuple[list[Path | bytes], bool]:
    """The files to read, and whether they came from a folder (non-DICOM skipped quietly)."""
    if isinstance(source, str | Path):
        folder = Path(source)
        if not folder.is_dir():
            raise ImageError("a volume needs a folder or a list of DICOM files")
        try:
            entries = sorted(
                p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
            )
        except OSError as exc:
            raise ImageError(f"cannot list the folder: {exc.strerror}") from None
        if len(entries) > max_files:
            raise ImageError(f"the folder holds more than {max_files} files")
        return list(entries), True
    items = list(source)
    if len(items) > max_files:
        raise ImageError(f"a series of more than {max_files} files is refused")
    refs: list[Path | bytes] = []
    for item in items:
        if isinstance(item, str | Path):
            refs.append(Path(item))
        elif isinstance(item, bytes | bytearray | memoryview):
            refs.append(bytes(item))
        else:
            raise ImageError(f"unsupported series item type {type(item).__name__}")
    return refs, False


def _read_header(ref: Path | bytes) -> Dataset | None:
    """The header without pixel data, or None when the data is not DICOM."""
    try:
        if isinstance(ref, Path):
            most = limits.current().max_dicom_bytes
            if ref.stat().st_size > most:
                raise ImageError(f"DICOM file is larger than {most} bytes")
            with ref.open("rb") as handle:
                head = handle.read(132)
                if not _dicom.looks_like_dicom(head):
                    return None
                handle.seek(0)
                return _header(handle, head)
        if not _dicom.looks_like_dicom(ref[:132]):
            return None
        return _header(io.BytesIO(ref), ref[:132])
    except FileNotFoundError:
        raise ImageError("image file not found", hint="check the path") from None
    except OSError as exc:
        raise ImageError(f"cannot read image file: {exc.strerror}") from None


def _header(handle: Any, head: bytes) -> Dataset:
    has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(handle, stop_before_pixels=True, force=not has_preamble)
            for _ in ds:
                pass
    except Exception:  # pydicom's messages may quote the data
        raise ImageError("DICOM data is truncated or corrupt") from None
    return ds


def _is_image_header(ds: Dataset) -> bool:
    sop = _dicom._sop_class(ds)
    if any(sop.startswith(prefix) for prefix, _ in _dicom._REFUSED_SOP_PREFIXES):
        return False
    return "DirectoryRecordSequence" not in ds and "Rows" in ds and "Columns" in ds


def _series_number(ds: Dataset) -> str:
    try:
        return str(int(ds.get("SeriesNumber")))
    except (TypeError, ValueError):
        return "?"


def _one_series(headers: list[_Header]) -> list[_Header]:
    groups: dict[str, list[_Header]] = {}
    for header in headers:
        uid = str(header.ds.get("SeriesInstanceUID", "") or "")
        groups.setdefault(uid, []).append(header)
    if len(groups) == 1:
        return headers
    described = []
    for members in sorted(groups.values(), key=lambda m: (_series_number(m[0].ds), -len(m))):
        modality = _dicom._modality(members[0].ds) or "?"
        described.append(f"series {_series_number(members[0].ds)} ({modality}, {len(members)})")
    raise ImageError(
        f"the input mixes {len(groups)} series; one is needed: " + ", ".join(described),
        hint="put one series in the folder, or pass the files of one series",
    )


# ----------------------------------------------------------------------------- ordering


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray | None:
    try:
        value = ds.get(keyword)
        if value is None:
            return None
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        return None
    return array


def _instance(ds: Dataset) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def slice_normal(orientation: Sequence[float] | np.ndarray) -> np.ndarray:
    """The unit normal of a slice: row direction x column direction (ImageOrientationPatient)."""
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise ImageError("DICOM ImageOrientationPatient is degenerate")
    return normal / length


def _order(
    headers: list[_Header], notes: list[str]
) -> tuple[list[_Header], list[float | None], str]:
    positions = [_floats(h.ds, "ImagePositionPatient", 3) for h in headers]
    orientations = [_floats(h.ds, "ImageOrientationPatient", 6) for h in headers]
    instances = [_instance(h.ds) for h in headers]
    if all(p is not None for p in positions) and all(o is not None for o in orientations):
        first = orientations[0]
        assert first is not None
        normal = slice_normal(first)
        if any(not np.allclose(o, first, atol=1e-3) for o in orientations if o is not None):
            notes.append("slice orientations differ within the series: ordered along the first")
        along = [round(float(np.dot(p, normal)), _POSITION_DECIMALS) for p in positions]  # type: ignore[arg-type]
        keys = [
            (along[i], instances[i] if instances[i] is not None else 2**31, h.input_index)
            for i, h in enumerate(headers)
        ]
        order = sorted(range(len(headers)), key=lambda i: keys[i])
        kept: list[int] = []
        for i in order:
            if kept and along[kept[-1]] == along[i]:
                continue  # same position: the lowest InstanceNumber (then input order) stays
            kept.append(i)
        dropped = len(order) - len(kept)
        if dropped:
            notes.append(
                f"{dropped} slice(s) at an already seen position dropped "
                "(kept the lowest InstanceNumber)"
            )
        ordered = [headers[i] for i in kept]
        kept_positions: list[float | None] = [along[i] for i in kept]
        _check_spacing([along[i] for i in kept], notes)
        return ordered, kept_positions, "position"
    if all(n is not None for n in instances):
        notes.append(
            "slice positions (ImagePositionPatient/ImageOrientationPatient) missing: "
            "ordered by InstanceNumber, which may not follow the anatomy"
        )
        order = sorted(range(len(headers)), key=lambda i: (instances[i], headers[i].input_index))
        if len({instances[i] for i in order}) < len(order):
            notes.append("repeated InstanceNumbers: their slices kept in input order")
        return [headers[i] for i in order], [None] * len(order), "instance_number"
    raise ImageError(
        "the slices have neither positions nor instance numbers: their order is unknown",
        hint="pass a series with ImagePositionPatient and ImageOrientationPatient",
    )


def _check_spacing(along: list[float], notes: list[str]) -> None:
    if len(along) < 3:
        return
    gaps = np.diff(np.asarray(along))
    median = float(np.median(gaps))
    if median <= 0:
        return
    if float(gaps.max()) > 1.5 * median or float(gaps.min()) < median / 1.5:
        notes.append(
            f"uneven slice spacing: gaps from {float(gaps.min()):.2f} to "
            f"{float(gaps.max()):.2f} mm (median {median:.2f}); slices may be missing"
        )


def sample_evenly(count: int, most: int) -> list[int]:
    """At most `most` indices of `count`, evenly spread, the first and the last included."""
    if most < 1:
        raise ImageError("max_slices must be at least 1")
    if count <= most:
        return list(range(count))
    if most == 1:
        return [count // 2]
    return [int(i) for i in np.round(np.linspace(0, count - 1, most)).astype(int)]


# ------------------------------------------------------------------------------ loading


def load_volume(
    source: VolumeSource,
    *,
    modality: str | None = None,
    recipe: str | None = None,
    preset: str | None = None,
    window: tuple[float, float] | None = None,
    max_slices: int = DEFAULT_MAX_SLICES,
    max_files: int | None = None,
    max_pixels: int | None = None,
) -> Volume:
    """One series into at most `max_slices` prepared slices in anatomical order.

    source: a folder (non-DICOM files in it are skipped and counted) or a list of DICOM
    paths or bytes (every item must be DICOM). modality: "CT" or "MR" to override the
    files' Modality tag for the recipe. preset/window: a CT preset or (center, width),
    applied to every slice; recipe: any recipe of `load_dicom`, forced on every slice.
    """
    if max_slices < 1:
        raise ImageError("max_slices must be at least 1")
    max_files = max_files or limits.current().max_series_files
    max_pixels = max_pixels or limits.current().max_pixels
    refs, from_folder = _inputs(source, max_files)
    notes: list[str] = []
    headers: list[_Header] = []
    skipped = 0
    for index, ref in enumerate(refs):
        ds = _read_header(ref)
        if ds is None or (from_folder and not _is_image_header(ds)):
            if not from_folder:
                raise ImageError(f"series item {index + 1} is not DICOM")
            skipped += 1
            continue
        headers.append(_Header(ref, index, ds))
    if skipped:
        notes.append(f"{skipped} file(s) in the folder skipped: not DICOM images")
    if not headers:
        raise ImageError("no DICOM image found in the series input")
    headers = _one_series(headers)
    for header in headers:
        if _dicom._int(header.ds, "NumberOfFrames", 1) > 1:
            raise ImageError(
                "a multi-frame file inside a series is not supported",
                hint="pass the multi-frame file on its own",
            )
    ordered, positions, ordered_by = _order(headers, notes)
    chosen = sample_evenly(len(ordered), max_slices)
    if len(chosen) < len(ordered):
        notes.append(f"{len(ordered)} slices sampled evenly to {len(chosen)}")

    # Limits on what will be decoded, from the headers alone.
    total = 0
    for i in chosen:
        ds = ordered[i].ds
        rows, columns = _dicom._int(ds, "Rows"), _dicom._int(ds, "Columns")
        total += rows * columns * _dicom._int(ds, "SamplesPerPixel", 1)
    if total > max_pixels:
        raise ImageError(f"the sampled slices hold more than {max_pixels} pixels in all")
    sizes = {(ordered[i].ds.get("Rows"), ordered[i].ds.get("Columns")) for i in chosen}
    if len(sizes) > 1:
        notes.append("slices differ in size: each is resized to the model's square")

    series_modality = _dicom._modality(ordered[0].ds)
    wanted = (modality or series_modality or "").strip().upper() or None
    if modality is not None and series_modality and wanted != series_modality:
        notes.append(f"modality {wanted} assumed for a {series_modality} series")
    if recipe is None and preset is None and window is None:
        if wanted == "CT":
            recipe = "ct_windows"
        else:
            recipe = "min_max"
            if wanted != "MR":
                notes.append(
                    f"modality {wanted or 'unknown'} is neither CT nor MR: "
                    "one min-max over the volume applied"
                )

    datasets = [_full_dataset(ordered[i].ref) for i in chosen]
    value_range = _volume_range(datasets) if recipe == "min_max" else None

    slices: list[PreparedImage] = []
    slice_notes: list[str] = []
    for number, (i, ds) in enumerate(zip(chosen, datasets, strict=True), start=1):
        prepared = _dicom.prepare_dataset(
            ds,
            recipe=recipe,
            preset=preset,
            window=window,
            frames=[0],
            value_range=value_range,
            label=f"slice {number}",
        )[0]
        base = prepared.provenance
        assert base is not None
        for note in base.warnings:
            if note not in slice_notes:
                slice_notes.append(note)
        provenance = SliceProvenance(
            **base.to_dict(),
            slice_number=number,
            order_index=i,
            series_slices=len(ordered),
            position=positions[i],
            instance_number=_instance(ds),
        )
        slices.append(PreparedImage(prepared.pixels, source=prepared.source, provenance=provenance))
    final_recipe = slices[0].provenance.recipe if slices[0].provenance else str(recipe)
    return Volume(
        slices=tuple(slices),
        modality=series_modality,
        recipe=final_recipe,
        ordered_by=ordered_by,
        series_slices=len(ordered),
        sampled=tuple(chosen),
        positions=tuple(positions[i] for i in chosen),
        value_range=value_range,
        skipped_files=skipped,
        warnings=tuple(notes + slice_notes),
    )


def _full_dataset(ref: Path | bytes) -> Dataset:
    return _dicom.read_dataset(ref)


def _volume_range(datasets: list[Dataset]) -> tuple[float, float]:
    """(min, max) of the modality values over every sampled slice: one scale for the volume."""
    lo, hi = np.inf, -np.inf
    for ds in datasets:
        _dicom.check_image(ds)
        frame, _ = _dicom._decode(ds, None)
        if frame.ndim == 3:
            raise ImageError("a colour series cannot be scaled as one grey volume")
        values = _dicom.modality_values(frame, ds)
        lo = min(lo, float(np.min(values)))
        hi = max(hi, float(np.max(values)))
    return lo, hi


# ------------------------------------------------------------------------------- prompt

DEFAULT_INSTRUCTION = (
    "You are reviewing {count} consecutive {modality}slices of one series, in anatomical "
    "order, labelled SLICE 1 to SLICE {count}. Please review the slices provided below "
    "carefully."
)


def volume_parts(
    instruction: str, slices: Sequence[PreparedImage], question: str
) -> list[str | PreparedImage]:
    """Google's notebook order as an ordered list of parts: the instruction, then each slice
    followed by its `SLICE n` label (1-based), the question last."""
    parts: list[str | PreparedImage] = [instruction]
    for number, image in enumerate(slices, start=1):
        parts.append(image)
        parts.append(f"SLICE {number}")
    parts.append(question)
    return parts


def default_instruction(volume: Volume) -> str:
    modality = f"{volume.modality} " if volume.modality in ("CT", "MR") else ""
    return DEFAULT_INSTRUCTION.format(count=len(volume.slices), modality=modality)


def volume_messages(
    question: str,
    slices: Volume | Sequence[PreparedImage],
    *,
    instruction: str | None = None,
) -> list[Any]:
    """The engine's `messages=` for a volume, in Google's notebook order: the instruction,
    each slice followed by its `SLICE n` label, the question last (one user turn of ordered
    parts; a runtime that cannot interleave, Ollama, gets the slices then the texts)."""
    from coheara.engine.chat_format import InputMessage

    images = tuple(slices.slices if isinstance(slices, Volume) else slices)
    if not images:
        raise ImageError("the volume has no slices")
    if instruction is None:
        if isinstance(slices, Volume):
            instruction = default_instruction(slices)
        else:
            instruction = DEFAULT_INSTRUCTION.format(count=len(images), modality="")
    return [InputMessage.from_parts("user", volume_parts(instruction, images, question))]
