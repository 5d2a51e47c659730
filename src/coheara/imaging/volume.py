"""A CT or MR volume into ordered, sampled slices: a series (a folder, or a list of files
or bytes) or one multi-frame file whose frames are slices (Enhanced CT/MR, legacy
multi-frame).

The recipe of Google's MedGemma notebooks (DESIGN.md section 1):

- one series only; slices ordered by their position along the slice normal
  (ImagePositionPatient projected on the cross product of ImageOrientationPatient's row
  and column vectors), InstanceNumber only as a fallback, with a warning; the frames of
  one multi-frame file the same way, from their functional groups (PlanePositionSequence)
  or a spatial frame increment (GridFrameOffsetVector, SliceLocation), frame order only
  as a fallback, with a warning;
- sampled evenly to at most 85 slices, the first and the last kept;
- CT: the three-window RGB on each slice (or a preset or window passed through);
  MR: ONE min-max over the whole sampled volume, so a dark slice stays dark;
- the prompt: the instruction, then each slice followed by `SLICE n`, the question last.

Headers are read first (`stop_before_pixels`); every limit (file count, folder depth,
pixels in all) is checked before any pixel is decoded, and only the sampled slices or
frames are decoded, each once. Each file is parsed once: a sampled file's pixel data is
read from where its header stopped, the files left out are never read further. Errors
and warnings never carry patient data: only counts, series numbers, modality codes and
positions.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from coheara.errors import ImageError
from coheara.imaging import dicom as _dicom
from coheara.imaging import limits
from coheara.imaging.image import PreparedImage, Provenance, file_errors

DEFAULT_MAX_SLICES = 85
"""Most slices sent to the model, as in Google's CT and MRI notebooks."""

MAX_FOLDER_DEPTH = 8
"""Most levels of subfolders walked (a DICOM CD nests 3: DICOM/ST000001/SE000001)."""

_POSITION_DECIMALS = 3
"""Positions equal to a micrometre are the same position (a duplicate slice)."""

_SPATIAL_INCREMENTS = ("GridFrameOffsetVector", "SliceLocationVector", "SliceLocation")
"""Frame increments that place a legacy multi-frame file's frames in space (not in time)."""

VolumeSource = (
    str
    | Path
    | bytes
    | bytearray
    | memoryview
    | Sequence[str | Path | bytes | bytearray | memoryview]
)

_Kind = Literal["folder", "list", "file"]


@dataclass(frozen=True)
class SliceProvenance(Provenance):
    """A slice's provenance plus where it sits in the series (non-identifying)."""

    slice_number: int = 0
    """1-based number in the sampled volume: the `SLICE n` label."""
    order_index: int = 0
    """0-based index in the whole ordered series, before sampling."""
    series_slices: int = 0
    position: float | None = None
    """Millimetres along the slice normal (None when ordered by InstanceNumber or frame)."""
    instance_number: int | None = None
    """The file's InstanceNumber (None for the frames of a multi-frame file: see frame_index)."""


@dataclass(frozen=True, eq=False)
class Volume:
    """Prepared slices in anatomical order, with what was done and what to watch."""

    slices: tuple[PreparedImage, ...]
    modality: str | None
    recipe: str
    ordered_by: str
    """"position" (along the slice normal), or the fallbacks "instance_number" (files of a
    series) and "frame" (frames of one multi-frame file)."""
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
    """One file's header; `ref` is how to read the rest of it (a path or the bytes)."""

    ref: Path | bytes
    input_index: int
    ds: Dataset
    pixels_at: int | None = None
    """Where the header stopped (the pixel data element) in the file, when the rest of the
    file can be read from there; None: the file is read again whole."""


@dataclass(frozen=True)
class _Slice:
    """One slice of the ordered series: a single-frame file, or one frame of a multi-frame file."""

    header: _Header
    frame: int | None
    """None for a single-frame file; the 0-based frame index in a multi-frame file."""
    position: float | None


# ---------------------------------------------------------------------------- gathering


def _inputs(
    source: VolumeSource, max_files: int, notes: list[str]
) -> tuple[list[Path | bytes], _Kind]:
    """The files to read and what they came as: a folder (non-DICOM skipped quietly), a
    list (every item must be DICOM) or one file (a multi-frame volume)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return [bytes(source)], "file"
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except (OSError, ValueError):
            is_dir = is_file = False
        if is_dir:
            return list(_walk(path, max_files, notes)), "folder"
        if is_file:
            return [path], "file"
        raise ImageError(
            "a volume needs a folder, a list of DICOM files or one multi-frame DICOM file",
            hint="check the path",
        )
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
    return refs, "list"


def _walk(
    folder: Path, max_files: int, notes: list[str], max_depth: int = MAX_FOLDER_DEPTH
) -> list[Path]:
    """Every file under `folder`, top-down in name order, as a DICOM CD or export lays them
    out (a DICOMDIR at the top, the images in subfolders).

    Hidden entries and DICOMDIR files are skipped; no symbolic link is followed, to a file
    or a folder, so nothing outside the folder is read. The file count is checked while
    walking, before any header is read.
    """
    files: list[Path] = []
    links = 0
    folders = 0
    pending: list[tuple[Path, int]] = [(folder, 0)]
    while pending:
        current, depth = pending.pop()
        try:
            with os.scandir(current) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
            subfolders: list[Path] = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_symlink():
                    links += 1
                elif entry.is_dir(follow_symlinks=False):
                    subfolders.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False) and entry.name.upper() != "DICOMDIR":
                    files.append(Path(entry.path))
                    if len(files) > max_files:
                        raise ImageError(f"the folder holds more than {max_files} files")
        except OSError as exc:
            raise ImageError(f"cannot list the folder: {exc.strerror}") from None
        if subfolders and depth >= max_depth:
            raise ImageError(
                f"the folder nests more than {max_depth} levels of subfolders",
                hint="pass the folder of one series",
            )
        folders += len(subfolders)
        if folders > max_files:
            raise ImageError(f"the folder holds more than {max_files} subfolders")
        pending.extend((sub, depth + 1) for sub in reversed(subfolders))
    if links:
        notes.append(f"{links} symbolic link(s) in the folder not followed")
    return files


def _where(kind: _Kind, index: int, count: int) -> str:
    """Which input an error is about, without its name: its rank in the input."""
    if kind == "list":
        return f"series item {index + 1}"
    if kind == "folder":
        return f"file {index + 1} of {count} in the folder (in path order)"
    return ""


def _located(error: ImageError, where: str) -> ImageError:
    """The error with which input it is about in front (one input: as it is)."""
    if not where:
        return error
    return ImageError(f"{where}: {error.message}", hint=error.hint)


def _read_header(ref: Path | bytes) -> tuple[Dataset, bool, int | None] | None:
    """The header without pixel data, whether anything (the pixel data) follows it, and
    where it stopped when the rest can be read from there (`_with_pixels`); None when the
    data is not DICOM."""
    with file_errors():
        if isinstance(ref, Path):
            most = limits.current().max_dicom_bytes
            size = ref.stat().st_size
            if size > most:
                raise ImageError(f"DICOM file is larger than {most} bytes")
            with ref.open("rb") as handle:
                head = handle.read(132)
                if not _dicom.looks_like_dicom(head):
                    return None
                handle.seek(0)
                return _header(handle, head, size)
        if not _dicom.looks_like_dicom(ref[:132]):
            return None
        return _header(io.BytesIO(ref), ref[:132], len(ref))


def _header(handle: Any, head: bytes, size: int) -> tuple[Dataset, bool, int | None]:
    has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(handle, stop_before_pixels=True, force=not has_preamble)
            for _ in ds:
                pass
            # pydicom stops quietly at the end of a truncated file; a header that reaches
            # the end has no pixel data after it (a non-image object, or a cut-off image).
            stopped = handle.tell()
            follows = stopped < size
    except Exception:  # pydicom's messages may quote the data
        raise ImageError("DICOM data is truncated or corrupt") from None
    meta = getattr(ds, "file_meta", None)
    deflated = meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    # A deflated file's positions are in its inflated copy, not in the file: read it whole.
    return ds, follows, (stopped if follows and not deflated else None)


def _not_an_image(ds: Dataset, follows: bool) -> str | None:
    """Why a parsed header is no image to prepare, or None when it is one."""
    sop = _dicom._sop_class(ds)
    for prefix, what in _dicom._REFUSED_SOP_PREFIXES:
        if sop.startswith(prefix):
            return f"DICOM object is {what}"
    if "DirectoryRecordSequence" in ds:
        return "DICOM object is a DICOMDIR (a media index, not an image)"
    if follows and "Rows" in ds and "Columns" in ds:
        return None
    if _claims_image(sop):
        return "DICOM data is truncated or corrupt (the header stops before the pixel data)"
    return "DICOM object has no image, or its header is truncated"


def _claims_image(sop: str) -> bool:
    """Whether a SOP class is a standard image storage class (CT Image Storage, ...)."""
    try:
        return bool(sop) and "Image Storage" in UID(sop).name
    except Exception:
        return False


def _frame_count(ds: Dataset) -> int:
    return _dicom._int(ds, "NumberOfFrames", 1)


def is_multiframe_volume(source: Dataset | str | Path | bytes | bytearray | memoryview) -> bool:
    """Whether one DICOM file is a volume on its own: a CT or MR image of several frames.

    Such a file (Enhanced CT/MR, legacy multi-frame) belongs to `load_volume`, which orders
    and samples its frames, not to `load_dicom`, which gives every frame in file order.
    Takes a parsed dataset (a header read with `stop_before_pixels` is enough) or a path
    or bytes, of which only the header is read. Never raises: anything that is not a
    readable DICOM image header is False (its own loader then says what is wrong).
    """
    try:
        parsed: tuple[Dataset, bool, int | None] | None
        if isinstance(source, Dataset):
            follows = "PixelData" in source or _dicom._int(source, "Rows", 0) > 0
            parsed = (source, follows, None)
        elif isinstance(source, bytes | bytearray | memoryview):
            parsed = _read_header(bytes(source))
        else:
            path = Path(source)
            parsed = _read_header(path) if path.is_file() else None
        if parsed is None or _not_an_image(parsed[0], parsed[1]) is not None:
            return False
        ds = parsed[0]
        return _frame_count(ds) > 1 and _dicom._modality(ds) in ("CT", "MR")
    except (ImageError, OSError, ValueError, TypeError):
        return False


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
        hint=(
            "pass one series' folder (on a DICOM CD or export, the subfolder that holds "
            "that series), or the files of one series"
        ),
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


def _along_normal(
    positions: Sequence[np.ndarray], orientations: Sequence[np.ndarray], notes: list[str], what: str
) -> list[float]:
    """Each position projected on the first orientation's slice normal, in mm."""
    first = orientations[0]
    normal = slice_normal(first)
    if any(not np.allclose(o, first, atol=1e-3) for o in orientations):
        notes.append(f"slice orientations differ within the {what}: ordered along the first")
    return [round(float(np.dot(p, normal)), _POSITION_DECIMALS) for p in positions]


def _by_position(along: list[float], ties: Sequence[tuple[int, ...]]) -> tuple[list[int], int]:
    """Indices sorted along the normal, one per position (the lowest tie key stays), and
    how many were dropped as duplicates."""
    order = sorted(range(len(along)), key=lambda i: (along[i], *ties[i]))
    kept: list[int] = []
    for i in order:
        if kept and along[kept[-1]] == along[i]:
            continue
        kept.append(i)
    return kept, len(order) - len(kept)


def _or_last(instance: int | None) -> int:
    """A missing InstanceNumber sorts after every real one."""
    return instance if instance is not None else 2**31


def _order(headers: list[_Header], notes: list[str]) -> tuple[list[_Slice], str]:
    """The files of a series in anatomical order (InstanceNumber only as a fallback)."""
    positions = [_floats(h.ds, "ImagePositionPatient", 3) for h in headers]
    orientations = [_floats(h.ds, "ImageOrientationPatient", 6) for h in headers]
    instances = [_instance(h.ds) for h in headers]
    if all(p is not None for p in positions) and all(o is not None for o in orientations):
        along = _along_normal(positions, orientations, notes, "series")  # type: ignore[arg-type]
        ties = [(_or_last(instances[i]), h.input_index) for i, h in enumerate(headers)]
        kept, dropped = _by_position(along, ties)
        if dropped:
            notes.append(
                f"{dropped} slice(s) at an already seen position dropped "
                "(kept the lowest InstanceNumber)"
            )
        _check_spacing([along[i] for i in kept], notes)
        return [_Slice(headers[i], None, along[i]) for i in kept], "position"
    if all(n is not None for n in instances):
        notes.append(
            "slice positions (ImagePositionPatient/ImageOrientationPatient) missing: "
            "ordered by InstanceNumber, which may not follow the anatomy"
        )
        order = sorted(range(len(headers)), key=lambda i: (instances[i], headers[i].input_index))
        if len({instances[i] for i in order}) < len(order):
            notes.append("repeated InstanceNumbers: their slices kept in input order")
        return [_Slice(headers[i], None, None) for i in order], "instance_number"
    raise ImageError(
        "the slices have neither positions nor instance numbers: their order is unknown",
        hint="pass a series with ImagePositionPatient and ImageOrientationPatient",
    )


def _frame_positions(ds: Dataset, count: int, notes: list[str]) -> list[float] | None:
    """Each frame's position along the slice normal in mm, or None when the file has none.

    Enhanced CT/MR: PlanePositionSequence per frame, PlaneOrientationSequence per frame or
    shared (else the top-level ImageOrientationPatient). Legacy multi-frame: the frame
    increment, when it is spatial (GridFrameOffsetVector, SliceLocation[Vector]).
    """
    try:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        groups = len(per_frame) if per_frame else 0
    except Exception:
        raise ImageError("DICOM functional groups are malformed") from None
    if groups:
        if groups != count:
            notes.append("per-frame functional groups do not match the frame count: ignored")
        else:
            top = _floats(ds, "ImageOrientationPatient", 6)
            positions: list[np.ndarray] = []
            orientations: list[np.ndarray] = []
            for i in range(count):
                plane = _dicom.frame_group_item(ds, "PlanePositionSequence", i)
                turn = _dicom.frame_group_item(ds, "PlaneOrientationSequence", i)
                position = _floats(plane, "ImagePositionPatient", 3) if plane else None
                orientation = _floats(turn, "ImageOrientationPatient", 6) if turn else top
                if position is None or orientation is None:
                    break
                positions.append(position)
                orientations.append(orientation)
            else:
                return _along_normal(positions, orientations, notes, "file")
    pointer = ds.get("FrameIncrementPointer")
    tags = [pointer] if isinstance(pointer, int) else list(pointer or [])
    for tag in tags:
        try:
            keyword = keyword_for_tag(int(tag))
        except (TypeError, ValueError):
            continue
        if keyword not in _SPATIAL_INCREMENTS:
            continue
        offsets = _floats(ds, keyword, count)
        if offsets is None:
            continue
        base = 0.0
        if keyword == "GridFrameOffsetVector" and offsets[0] == 0:
            # Offsets relative to the first frame's ImagePositionPatient, along the normal.
            origin = _floats(ds, "ImagePositionPatient", 3)
            orientation = _floats(ds, "ImageOrientationPatient", 6)
            if origin is not None and orientation is not None:
                base = float(np.dot(origin, slice_normal(orientation)))
        return [round(base + float(o), _POSITION_DECIMALS) for o in offsets]
    return None


def _order_frames(header: _Header, notes: list[str]) -> tuple[list[_Slice], str]:
    """The frames of one multi-frame file in anatomical order (frame order as a fallback)."""
    count = _frame_count(header.ds)
    most = limits.current().max_frames
    if count > most:  # before any per-frame work: the header alone may claim millions
        raise ImageError(f"DICOM image has more than {most} frames")
    along = _frame_positions(header.ds, count, notes)
    if along is None:
        notes.append(
            "frame positions (PlanePositionSequence or a spatial FrameIncrementPointer) "
            "missing: ordered by frame number, which may not follow the anatomy"
        )
        return [_Slice(header, i, None) for i in range(count)], "frame"
    if len(set(along)) == 1:
        notes.append(
            "all frames share one position (a time series, not a volume?): kept in frame order"
        )
        return [_Slice(header, i, along[i]) for i in range(count)], "frame"
    kept, dropped = _by_position(along, [(i,) for i in range(count)])
    if dropped:
        notes.append(
            f"{dropped} frame(s) at an already seen position dropped (kept the first frame "
            "at each; the file may hold several echoes, phases or stacks)"
        )
    _check_spacing([along[i] for i in kept], notes)
    return [_Slice(header, i, along[i]) for i in kept], "position"


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
    """One series, or one multi-frame file, into at most `max_slices` prepared slices in
    anatomical order.

    source: a folder, walked into its subfolders as a DICOM CD or export lays them out
    (non-DICOM files skipped and counted, DICOMDIR ignored); a list of DICOM paths or
    bytes (every item must be DICOM); or one multi-frame CT or MR file (a path or its
    bytes, see `is_multiframe_volume`), whose frames are the slices. modality: "CT" or
    "MR" to override the files' Modality tag for the recipe. preset/window: a CT preset
    or (center, width), applied to every slice; recipe: any recipe of `load_dicom`,
    forced on every slice.
    """
    if max_slices < 1:
        raise ImageError("max_slices must be at least 1")
    _dicom._choose(recipe, preset, window)  # a bad choice fails before anything is read
    max_files = max_files or limits.current().max_series_files
    max_pixels = max_pixels or limits.current().max_pixels
    notes: list[str] = []
    refs, kind = _inputs(source, max_files, notes)
    headers: list[_Header] = []
    skipped = 0
    for index, ref in enumerate(refs):
        where = _where(kind, index, len(refs))
        try:
            parsed = _read_header(ref)
        except ImageError as exc:
            raise _located(exc, where) from None
        if parsed is None:
            if kind == "list":
                raise ImageError(f"series item {index + 1} is not DICOM")
            if kind == "file":
                raise ImageError("data is not DICOM")
            skipped += 1
            continue
        ds, follows, pixels_at = parsed
        why = _not_an_image(ds, follows)
        if why is not None:
            # A folder may hold reports, presentation states and vendor objects beside the
            # images; a cut-off image, or anything not an image in a list, is an error.
            if kind != "folder" or _claims_image(_dicom._sop_class(ds)):
                raise _located(ImageError(why), where)
            skipped += 1
            continue
        headers.append(_Header(ref, index, ds, pixels_at))
    if skipped:
        notes.append(f"{skipped} file(s) in the folder skipped: not DICOM images")
    if not headers:
        raise ImageError("no DICOM image found in the series input")
    headers = _one_series(headers)
    multiframe = [h for h in headers if _frame_count(h.ds) > 1]
    if multiframe and len(headers) > 1:
        raise ImageError(
            "a multi-frame file inside a series is not supported",
            hint="pass the multi-frame file on its own",
        )
    if multiframe:
        ordered, ordered_by = _order_frames(headers[0], notes)
    else:
        ordered, ordered_by = _order(headers, notes)
    chosen = sample_evenly(len(ordered), max_slices)
    if len(chosen) < len(ordered):
        notes.append(f"{len(ordered)} slices sampled evenly to {len(chosen)}")

    # Limits on what will be decoded, from the headers alone.
    total = 0
    for i in chosen:
        ds = ordered[i].header.ds
        rows, columns = _dicom._int(ds, "Rows"), _dicom._int(ds, "Columns")
        total += rows * columns * _dicom._int(ds, "SamplesPerPixel", 1)
    if total > max_pixels:
        raise ImageError(f"the sampled slices hold more than {max_pixels} pixels in all")
    sizes = {
        (ordered[i].header.ds.get("Rows"), ordered[i].header.ds.get("Columns")) for i in chosen
    }
    if len(sizes) > 1:
        notes.append("slices differ in size: each is resized to the model's square")

    series_modality = _dicom._modality(ordered[0].header.ds)
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

    picked = [ordered[i] for i in chosen]
    decoded = _decoded(picked, kind, len(refs))
    value_range: tuple[float, float] | None = None
    if recipe == "min_max":
        # One pass decodes every sampled slice and keeps it in its stored dtype; the range
        # comes from those arrays, and the recipe then runs on them: each decoded once.
        kept = list(decoded)
        value_range = _volume_range(kept)
        decoded = iter(kept)

    slices: list[PreparedImage] = []
    slice_notes: list[str] = []
    for number, (i, (item, ds, frame, photometric)) in enumerate(
        zip(chosen, decoded, strict=True), start=1
    ):
        prepared = _dicom.prepare_frame(
            ds,
            frame,
            photometric=photometric,
            frame_index=item.frame or 0,
            recipe=recipe,
            preset=preset,
            window=window,
            value_range=value_range,
            label=f"slice {number}",
        )
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
            position=item.position,
            instance_number=_instance(ds) if item.frame is None else None,
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
        positions=tuple(ordered[i].position for i in chosen),
        value_range=value_range,
        skipped_files=skipped,
        warnings=tuple(notes + slice_notes),
    )


_Decoded = tuple[_Slice, Dataset, np.ndarray, str]
"""A sampled slice, its dataset, its decoded stored values and their photometric."""


def _decoded(picked: list[_Slice], kind: _Kind, inputs: int) -> Iterator[_Decoded]:
    """Decode the sampled slices one at a time, each once; only the sampled frames of a
    multi-frame file. A single-frame file's encoded pixels are dropped once decoded."""
    files: dict[int, Dataset] = {}
    for item in picked:
        header = item.header
        where = _where(kind, header.input_index, inputs)
        if item.frame is None:
            try:
                ds = _with_pixels(header)
                frame, photometric = _dicom.decode_frame(ds, 0)
            except ImageError as exc:
                raise _located(exc, where) from None
            del ds.PixelData  # decoded: keep only the array, in its stored dtype
        else:
            if header.input_index not in files:
                try:
                    whole = _with_pixels(header)
                    _dicom.check_image(whole)
                except ImageError as exc:
                    raise _located(exc, where) from None
                files[header.input_index] = whole
            ds = files[header.input_index]
            try:
                frame, photometric = _dicom._decode(ds, item.frame)
            except ImageError as exc:
                raise _located(exc, f"frame {item.frame + 1}") from None
        yield item, ds, frame, photometric


_PIXEL_TAGS = (
    b"\xe0\x7f\x10\x00",  # (7FE0,0010) PixelData, little endian
    b"\xe0\x7f\x08\x00",  # (7FE0,0008) FloatPixelData
    b"\xe0\x7f\x09\x00",  # (7FE0,0009) DoubleFloatPixelData
    b"\x7f\xe0\x00\x10",  # the same, big endian
    b"\x7f\xe0\x00\x08",
    b"\x7f\xe0\x00\x09",
)


def _with_pixels(header: _Header) -> Dataset:
    """The header's dataset with the rest of its file (the pixel data and anything after
    it) read from where the header stopped: each file is parsed once.

    The same elements as `dicom.read_dataset` of the whole file would give, checked the same
    way (each new element converted now, so a corrupt one fails here). A file whose rest
    does not start with a pixel data element in the header's encoding (changed since, or
    encoded unlike its header) is read again whole, as `dicom.read_dataset` reads it.
    """
    ds, offset = header.ds, header.pixels_at
    if offset is None:
        return _dicom.read_dataset(header.ref)
    rest = _rest_of(header.ref, offset)
    implicit, little = ds.original_encoding
    order = 0 if little else 3
    # pydicom's own test for explicit VR: two upper-case letters after the tag.
    explicit = len(rest) >= 6 and 0x40 < rest[4] < 0x5B and 0x40 < rest[5] < 0x5B
    if implicit is None or rest[:4] not in _PIXEL_TAGS[order : order + 3] or explicit == implicit:
        return _dicom.read_dataset(header.ref)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tail = read_dataset(
                io.BytesIO(rest),
                bool(implicit),
                bool(little),
                parent_encoding=ds.original_character_set,
            )
            tags = list(tail.keys())
            for tag in tags:
                ds[tag] = tail.get_item(tag)
            for tag in tags:  # converted now, as `dicom.read_dataset` touches every element
                ds[tag]
    except Exception:  # pydicom's messages may quote the data
        raise ImageError("DICOM data is truncated or corrupt") from None
    return ds


def _rest_of(ref: Path | bytes, offset: int) -> bytes:
    """The bytes of a file from `offset` on, under the DICOM size limit."""
    most = limits.current().max_dicom_bytes
    if isinstance(ref, bytes):
        if len(ref) > most:
            raise ImageError(f"DICOM data is larger than {most} bytes")
        return ref[offset:]
    with file_errors(), ref.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size > most:
            raise ImageError(f"image file is larger than {most} bytes")
        handle.seek(offset)
        return handle.read()


def _volume_range(decoded: list[_Decoded]) -> tuple[float, float]:
    """(min, max) of the modality values over every sampled slice: one scale for the volume."""
    lo, hi = np.inf, -np.inf
    for item, ds, frame, _ in decoded:
        if frame.ndim == 3:
            raise ImageError("a colour series cannot be scaled as one grey volume")
        low, high = _dicom.GreyValues(frame, ds, item.frame or 0).bounds()
        lo = min(lo, low)
        hi = max(hi, high)
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
