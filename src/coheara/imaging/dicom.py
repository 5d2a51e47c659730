"""Single DICOM images (and the frames of a multi-frame file) into MedGemma's 896x896 RGB.

The recipes follow Google's own MedGemma notebooks (DESIGN.md section 1):

- CT: Hounsfield units from the modality LUT, then three windows into R, G, B
  (red -1024..1024, green -135..215, blue 0..80 HU), or one named preset window.
- MR: one min-max scaling (over the image here; a volume passes its own range).
- Enhanced (multi-frame) CT and MR: the rescale and window of each frame come from its
  functional groups (per-frame, else shared), which pydicom 3's `apply_modality_lut`
  does not read; without them an enhanced CT would be read 1024 HU off.
- Radiographs and everything else: the file's own VOI LUT or window, else the full
  dynamic range; MONOCHROME1 inverted.
- Colour stays colour (YBR and palette colour converted to RGB).

Windows on stored integers go through a lookup table built once per dtype, rescale and
window (`GreyValues`), with the float formula's own rounding: the same bytes, faster. A
grey result is resized as one channel (`image.square_gray`), three windows from Pillow's
own RGB layout (`image.square_rgbx`).

Every check on the header (size, frames, pixel count, object type) runs before any
pixel is decoded. Errors are `ImageError` with one line that never carries patient
data: no names, IDs, dates, institutions, file names or pydicom's own messages.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from coheara.errors import ImageError
from coheara.imaging import image as _image
from coheara.imaging import limits
from coheara.imaging.image import PreparedImage, Provenance, read_file

# pydicom's warnings quote header values (names, free text) and also go to its logger,
# which Python's last-resort handler prints: keep them out of every log and terminal.
_pydicom_logger = logging.getLogger("pydicom")
_pydicom_logger.addHandler(logging.NullHandler())
_pydicom_logger.propagate = False

Recipe = Literal["ct_windows", "preset", "file_window", "min_max", "color"]
RECIPES: tuple[str, ...] = ("ct_windows", "preset", "file_window", "min_max", "color")

CT_WINDOWS: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))
"""(low, high) in HU for the red, green and blue channels, as in Google's CT notebook."""

CT_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (30.0, 150.0),
}
"""Named single windows as (center, width) in HU; a custom one is passed as `window=`."""

_REFUSED_SOP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.1.3.10", "a DICOMDIR (a media index, not an image)"),
    ("1.2.840.10008.5.1.4.1.1.88.", "a structured report, not an image"),
    ("1.2.840.10008.5.1.4.1.1.9.", "a waveform, not an image"),
    ("1.2.840.10008.5.1.4.1.1.481.", "a radiotherapy object, not an image"),
    ("1.2.840.10008.5.1.4.1.1.66", "a segmentation or registration object, not an image"),
    ("1.2.840.10008.5.1.4.1.1.104.", "an encapsulated document, not an image"),
    ("1.2.840.10008.5.1.4.1.1.11.", "a presentation state, not an image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.1.1", "a video, not a still image"),
)

_GDCM_HINT = "install python-gdcm (a coheara dependency: pip install python-gdcm)"
_LIBJPEG_HINT = (
    "12-bit JPEG needs libjpeg: pip install 'coheara[dicom-gpl]' (pylibjpeg-libjpeg, GPL-3.0)"
)
_DECODER_HINTS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "install pillow, python-gdcm or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.51": _LIBJPEG_HINT,
    "1.2.840.10008.1.2.4.57": _GDCM_HINT,
    "1.2.840.10008.1.2.4.70": _GDCM_HINT,
    "1.2.840.10008.1.2.4.80": "install pyjpegls (pip install pyjpegls)",
    "1.2.840.10008.1.2.4.81": "install pyjpegls (pip install pyjpegls)",
    "1.2.840.10008.1.2.4.90": "install pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "install pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "install pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "install pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "install pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "install pylibjpeg and pylibjpeg-rle",
}

_CODE = re.compile(r"^[A-Z0-9_ ]{1,16}$")


# ---------------------------------------------------------------------------- recognition


def looks_like_dicom(data: bytes) -> bool:
    """'DICM' at offset 128, or a preamble-less file that starts with group 0002 or 0008."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    if len(data) >= 8 and data[:2] == b"\x00\x08":  # big endian, explicit VR only
        return data[4:6].isalpha() and data[4:6].isupper()
    if len(data) < 8 or data[:2] not in (b"\x08\x00", b"\x02\x00"):
        return False
    # Explicit VR: two upper-case letters after the tag; implicit VR: a 32-bit length
    # that fits inside the data.
    if data[4:6].isalpha() and data[4:6].isupper():
        return True
    return int.from_bytes(data[4:8], "little") <= len(data)


# -------------------------------------------------------------------------------- reading


def read_dataset(source: str | Path | bytes | bytearray | memoryview) -> Dataset:
    """Parse a DICOM file or its bytes; pixel data stays encoded until a frame is asked for."""
    if isinstance(source, str | Path):
        data = read_file(Path(source), limits.current().max_dicom_bytes)
    else:
        data = bytes(source)
    return _parse(data)


def _parse(data: bytes) -> Dataset:
    if not data:
        raise ImageError("image is empty")
    most = limits.current().max_dicom_bytes
    if len(data) > most:
        raise ImageError(f"DICOM data is larger than {most} bytes")
    if not looks_like_dicom(data):
        raise ImageError("data is not DICOM")
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # force only for a preamble-less file whose first bytes already look like DICOM.
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
            # Touch every top-level element now, so a broken header fails here.
            for _ in ds:
                pass
    except ImageError:
        raise
    except Exception:  # pydicom raises many types; its messages may quote the data
        raise ImageError("DICOM data is truncated or corrupt") from None
    return ds


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    try:
        value = ds.get(keyword, default)
        if value is None or value == "":
            raise ImageError(f"DICOM image lacks {keyword}")
        return int(value)
    except ImageError:
        raise
    except (TypeError, ValueError):
        raise ImageError(f"DICOM {keyword} is not a number") from None


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return UID(str(uid))
    # Preamble-less files: what pydicom found while reading.
    if getattr(ds, "is_little_endian", True) is False:
        return UID("1.2.840.10008.1.2.2")
    if getattr(ds, "is_implicit_VR", True):
        return UID("1.2.840.10008.1.2")
    return UID("1.2.840.10008.1.2.1")


def _sop_class(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    return str(uid or "")


def check_image(ds: Dataset) -> int:
    """Refuse what is not a decodable image within the limits; return the frame count."""
    sop = _sop_class(ds)
    for prefix, what in _REFUSED_SOP_PREFIXES:
        if sop.startswith(prefix):
            raise ImageError(f"DICOM object is {what}")
    if "DirectoryRecordSequence" in ds:
        raise ImageError("DICOM object is a DICOMDIR (a media index, not an image)")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageError("DICOM float pixel data is not supported")
        raise ImageError("DICOM object has no pixel data")
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    samples = _int(ds, "SamplesPerPixel", 1)
    frames = _int(ds, "NumberOfFrames", 1)
    bits = _int(ds, "BitsAllocated")
    if rows <= 0 or columns <= 0 or frames <= 0:
        raise ImageError("DICOM image has zero size")
    if samples not in (1, 3):
        raise ImageError(f"DICOM image has {samples} samples per pixel; 1 or 3 are supported")
    if bits not in (1, 8, 16, 32, 64):
        raise ImageError(f"DICOM BitsAllocated {bits} is not supported")
    most = limits.current()
    if frames > most.max_frames:
        raise ImageError(f"DICOM image has more than {most.max_frames} frames")
    if rows * columns * samples > most.max_pixels:
        raise ImageError(f"DICOM image has more than {most.max_pixels} pixels")
    if rows * columns * samples * frames > most.max_pixels:
        raise ImageError(f"DICOM frames hold more than {most.max_pixels} pixels in all")
    ts = _transfer_syntax(ds)
    if not ts.is_compressed:
        try:
            expected = get_expected_length(ds, unit="bytes")
        except Exception:
            raise ImageError("DICOM image header is inconsistent") from None
        if len(ds.PixelData) < expected:
            raise ImageError("DICOM pixel data is truncated")
    return frames


# ------------------------------------------------------------------------------- decoding


def _decode(ds: Dataset, index: int | None) -> tuple[np.ndarray, str]:
    """Frames as an array (RGB for colour) and the photometric interpretation after decoding."""
    ts = _transfer_syntax(ds)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImageError(f"DICOM transfer syntax '{ts.name}' is not supported") from None
    hint = _DECODER_HINTS.get(str(ts), "install pylibjpeg or python-gdcm")
    if not decoder.is_available:
        raise ImageError(f"no decoder is installed for DICOM '{ts.name}'", hint=hint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options: dict[str, Any] = {"as_rgb": True}
            array, meta = decoder.as_array(ds, index=index, **options)
    except RuntimeError as exc:
        text = str(exc)
        if ts.is_compressed and ("missing dependencies" in text or "does not support" in text):
            raise ImageError(
                f"no installed decoder can decode this DICOM '{ts.name}' data", hint=hint
            ) from None
        raise ImageError("DICOM pixel data is truncated or corrupt") from None
    except Exception:
        raise ImageError("DICOM pixel data is truncated or corrupt") from None
    return array, str(meta.get("photometric_interpretation", ""))


# -------------------------------------------------------------------------------- windows


def scale_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high], scale to 0..255 and round: the notebooks' window."""
    if high <= low:
        raise ImageError("window width must be positive")
    scaled = (np.clip(values, low, high) - low) * 255.0 / (high - low)
    return np.round(scaled).astype(np.uint8)


def ct_windows(hu: np.ndarray) -> np.ndarray:
    """Hounsfield units (HxW) to the three-window RGB of Google's CT notebook (HxWx3 uint8)."""
    return np.stack([scale_window(hu, lo, hi) for lo, hi in CT_WINDOWS], axis=-1)


def preset_window(name: str) -> tuple[float, float]:
    try:
        return CT_PRESETS[name.lower()]
    except KeyError:
        raise ImageError(
            f"unknown CT preset '{name[:40]}'", hint="one of " + ", ".join(CT_PRESETS)
        ) from None


def center_width(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """One window given as (center, width), replicated later to R, G and B."""
    if width <= 0:
        raise ImageError("window width must be positive")
    return scale_window(values, center - width / 2.0, center + width / 2.0)


def min_max(values: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Full dynamic range to 0..255; a volume passes its own (min, max) as `value_range`."""
    lo, hi = value_range if value_range is not None else (float(values.min()), float(values.max()))
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return scale_window(values, lo, hi)


def dicom_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The DICOM VOI window (PS3.3 C.11.2.1.2 and .3) straight onto 0..255."""
    function = function.upper()
    values = values.astype(np.float64)
    if function == "SIGMOID":
        if width <= 0:
            raise ImageError("DICOM window width must be positive")
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ImageError("DICOM window width must be positive")
        out = np.clip((values - center) / width + 0.5, 0.0, 1.0) * 255.0
    else:  # LINEAR, the default
        if width < 1:
            raise ImageError("DICOM window width must be at least 1")
        out = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0
    return np.round(out).astype(np.uint8)


# --------------------------------------------------------------------- windows by table

TABLE_MOST = 65536
"""Most entries of a window's lookup table over the stored values (a 16-bit range)."""

_Window = tuple[Any, ...]
"""A window and its parameters: ("scale", low, high) for `scale_window`, or ("dicom",
center, width, function) for `dicom_window` (LINEAR and LINEAR_EXACT only)."""


def _apply_window(window: _Window, values: np.ndarray) -> np.ndarray:
    if window[0] == "scale":
        return scale_window(values, window[1], window[2])
    return dicom_window(values, window[1], window[2], window[3])


def _rescaled(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values through RescaleSlope/Intercept (left as they are for 1 and 0)."""
    if slope == 1 and intercept == 0:
        return stored
    return stored.astype(np.float64) * slope + intercept


_Layout = tuple[str, int | None, int, float, float]
"""How a table over the stored values is laid out: (dtype, first, count, slope, intercept)."""


@functools.lru_cache(maxsize=64)
def _window_table(
    dtype: str, first: int | None, count: int, slope: float, intercept: float, key: _Window
) -> np.ndarray:
    """The window of every stored value a frame may hold, computed as on the pixels.

    `first` None: all `count` values of a 16-bit or 8-bit dtype, in the order of their bit
    patterns read as unsigned (what `stored.view(unsigned)` indexes); else the integers
    `first` .. `first` + `count` - 1. The values have the stored dtype, so the rescale and
    the window see what they would see on the frame itself: the same float64 operations,
    element by element, hence the same bytes. `key` carries the window parameters with
    their types (an int bound and a float bound give different arithmetic).
    """
    kind = np.dtype(dtype)
    if first is None:
        domain = np.arange(count, dtype=np.int64).astype(kind.str.replace("i", "u")).view(kind)
    else:
        domain = np.arange(first, first + count, dtype=np.int64).astype(kind)
    window = tuple(value for _, value in key)
    table = _apply_window(window, _rescaled(domain, slope, intercept))
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=16)
def _rgbx_table(
    dtype: str,
    first: int | None,
    count: int,
    slope: float,
    intercept: float,
    keys: tuple[_Window, ...],
) -> np.ndarray:
    """Three windows' tables as one: each entry the bytes R, G, B, 255 read as a uint32, so
    one look-up gives a pixel in Pillow's own RGB layout (see `image.square_rgbx`)."""
    packed = np.full((count, 4), 255, dtype=np.uint8)
    for channel, key in enumerate(keys):
        packed[:, channel] = _window_table(dtype, first, count, slope, intercept, key)
    table = packed.view(np.uint32).reshape(count)
    table.flags.writeable = False
    return table


def _typed(window: _Window) -> _Window:
    """The window as a cache key: each value beside its type (5 == 5.0, yet they differ)."""
    return tuple((type(value).__name__, value) for value in window)


class GreyValues:
    """A grey frame's modality values (HU for CT) and the windows that map them to 0..255.

    Stored integers under RescaleSlope/Intercept (no Modality LUT Sequence) are windowed
    through a lookup table: the window is computed once for every value the stored dtype
    can hold (or the frame's own range, for 32-bit values), with the same float64 formula
    as on the pixels, then indexed by the stored values. A table is kept for the next frame
    with the same dtype, rescale and window (a volume builds it once). Float values, a
    Modality LUT Sequence, a range over `TABLE_MOST` values and the SIGMOID function are
    computed on the values themselves. Both ways give the same bytes (tests compare them
    over every 16-bit value).
    """

    def __init__(self, stored: np.ndarray, ds: Dataset, frame: int = 0) -> None:
        self.stored = stored
        self._values: np.ndarray | None = None
        self._rescale: tuple[float, float] | None = None
        self._bounds: tuple[float, float] | None = None
        self._layout: tuple[_Layout, np.ndarray] | None = None
        self._layout_found = False
        if ds.get("ModalityLUTSequence"):
            self._values = np.asarray(apply_modality_lut(stored, ds))
            return
        slope, intercept = _rescale(ds, frame)
        if stored.dtype.kind in "iu" and stored.size:
            self._rescale = (slope, intercept)
        else:
            self._values = _rescaled(stored, slope, intercept)

    @property
    def by_table(self) -> bool:
        """Whether the windows go through a lookup table."""
        return self._table_layout() is not None

    def values(self) -> np.ndarray:
        """The modality values themselves (what `modality_values` returns)."""
        if self._values is None:
            assert self._rescale is not None
            self._values = _rescaled(self.stored, *self._rescale)
        return self._values

    def bounds(self) -> tuple[float, float]:
        """(min, max) of the modality values, as floats."""
        if self._bounds is None:
            if self._rescale is None or self._values is not None:
                values = self.values()
            else:
                # The rescale is monotonic (rounding keeps the order), so the extremes of
                # the values are the rescaled extremes of the stored values.
                ends = [self.stored.min(), self.stored.max()]
                values = _rescaled(np.array(ends, dtype=self.stored.dtype), *self._rescale)
            self._bounds = (float(values.min()), float(values.max()))
        return self._bounds

    def window(self, low: float, high: float) -> np.ndarray:
        """`scale_window` of the modality values."""
        return self._windowed(("scale", low, high))

    def rgbx(self, windows: Sequence[tuple[float, float]]) -> np.ndarray:
        """Three (low, high) windows into R, G and B (`ct_windows` for `CT_WINDOWS`), as
        HxWx4 uint8 whose fourth byte is 255: Pillow's own RGB layout, one look-up a pixel."""
        found = self._table_layout()
        if found is None:
            out = np.empty((*self.stored.shape, 4), dtype=np.uint8)
            for channel, (low, high) in enumerate(windows):
                out[..., channel] = self.window(low, high)
            out[..., 3] = 255
            return out
        layout, index = found
        keys = tuple(_typed(("scale", low, high)) for low, high in windows)
        packed = np.take(_rgbx_table(*layout, keys), index)
        return packed.view(np.uint8).reshape(*self.stored.shape, 4)

    def center_width(self, center: float, width: float) -> np.ndarray:
        """`center_width` of the modality values."""
        if width <= 0:
            raise ImageError("window width must be positive")
        return self.window(center - width / 2.0, center + width / 2.0)

    def min_max(self, value_range: tuple[float, float] | None = None) -> np.ndarray:
        """`min_max` of the modality values."""
        lo, hi = value_range if value_range is not None else self.bounds()
        if hi <= lo:
            return np.zeros(self.stored.shape, dtype=np.uint8)
        return self.window(lo, hi)

    def dicom_window(self, center: float, width: float, function: str) -> np.ndarray:
        """`dicom_window` of the modality values."""
        if function.upper() == "SIGMOID":  # exp: kept off the table, computed per pixel
            return dicom_window(self.values(), center, width, function)
        return self._windowed(("dicom", center, width, function))

    def _windowed(self, window: _Window) -> np.ndarray:
        found = self._table_layout()
        if found is None:
            return _apply_window(window, self.values())
        layout, index = found
        return np.take(_window_table(*layout, _typed(window)), index)

    def _table_layout(self) -> tuple[_Layout, np.ndarray] | None:
        """The table layout for these stored values and each pixel's index into it; None
        when the windows are computed on the values."""
        if not self._layout_found:
            self._layout = self._find_layout()
            self._layout_found = True
        return self._layout

    def _find_layout(self) -> tuple[_Layout, np.ndarray] | None:
        if self._rescale is None:
            return None
        stored = self.stored
        dtype = stored.dtype
        first: int | None = None
        if dtype.itemsize <= 2:
            count = 1 << (8 * dtype.itemsize)
            index = stored.view(dtype.str.replace("i", "u"))
        elif dtype.itemsize == 4:
            first, last = int(stored.min()), int(stored.max())
            count = last - first + 1
            if count > TABLE_MOST:
                return None
            index = stored.astype(np.int64) - first
        else:
            return None
        return (dtype.str, first, count, *self._rescale), index


def _first_number(value: Any) -> float:
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)


def _file_window(
    ds: Dataset, values: GreyValues, frame: int = 0
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The file's own VOI LUT Sequence or window (an enhanced file's per frame), else None."""
    voi = ds.get("VOILUTSequence")
    if voi:
        try:
            item = voi[0]
            out = apply_voi_lut(values.values(), ds, prefer_lut=True).astype(np.float64)
            descriptor = item.LUTDescriptor
            bits = int(descriptor[2])
            top = float(max(2**bits - 1, np.max(np.asarray(item.LUTData))))
            scaled = np.round(np.clip(out / top, 0.0, 1.0) * 255.0).astype(np.uint8)
            return scaled, {"window": "voi_lut"}
        except ImageError:
            raise
        except Exception:
            raise ImageError("DICOM VOI LUT is malformed") from None
    source: Dataset | None = ds
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        source = frame_group_item(ds, "FrameVOILUTSequence", frame)
    if source is not None and "WindowCenter" in source and "WindowWidth" in source:
        try:
            center = _first_number(source.WindowCenter)
            width = _first_number(source.WindowWidth)
        except (TypeError, ValueError, IndexError):
            return None
        function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            function = "LINEAR"
        if width <= 0 or not np.isfinite(center) or not np.isfinite(width):
            return None
        return values.dicom_window(center, width, function), {
            "window": (center, width),
            "voi_function": function,
        }
    return None


# ------------------------------------------------------------------------ functional groups


def frame_group_item(ds: Dataset, macro: str, frame: int) -> Dataset | None:
    """The first item of an enhanced file's functional-group `macro` for one frame.

    The frame's own item of PerFrameFunctionalGroupsSequence first, else the
    SharedFunctionalGroupsSequence; None when neither holds it (or the file is not enhanced).
    """
    try:
        for groups, index in (
            ("PerFrameFunctionalGroupsSequence", frame),
            ("SharedFunctionalGroupsSequence", 0),
        ):
            sequence = ds.get(groups)
            if not sequence or not 0 <= index < len(sequence):
                continue
            inner = sequence[index].get(macro)
            if inner:
                item = inner[0]
                return item if isinstance(item, Dataset) else None
    except Exception:  # nested items are parsed on access; pydicom's messages may quote data
        raise ImageError("DICOM functional groups are malformed") from None
    return None


def _rescale_source(ds: Dataset, frame: int) -> Dataset:
    """Where a frame's RescaleSlope/Intercept live: its Pixel Value Transformation, else the top."""
    item = frame_group_item(ds, "PixelValueTransformationSequence", frame)
    if item is not None and ("RescaleSlope" in item or "RescaleIntercept" in item):
        return item
    return ds


# -------------------------------------------------------------------------------- recipes


def modality_values(stored: np.ndarray, ds: Dataset, frame: int = 0) -> np.ndarray:
    """The modality LUT first: a Modality LUT Sequence, else RescaleSlope/Intercept (HU for CT).

    `frame` picks the rescale of an enhanced file's frame (its functional groups), which
    pydicom's `apply_modality_lut` ignores. A missing slope counts as 1 and a missing
    intercept as 0 (pydicom skips the rescale unless both are present).
    """
    if ds.get("ModalityLUTSequence"):
        return np.asarray(apply_modality_lut(stored, ds))
    return _rescaled(stored, *_rescale(ds, frame))


def _rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    """A frame's (RescaleSlope, RescaleIntercept); a missing slope is 1, an intercept 0."""
    source = _rescale_source(ds, frame)
    try:
        slope = float(source.get("RescaleSlope", 1) or 1)
        intercept = float(source.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        raise ImageError("DICOM rescale slope or intercept is not a number") from None
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise ImageError("DICOM rescale slope or intercept is invalid")
    return slope, intercept


def default_recipe(modality: str | None, color: bool) -> str:
    if color:
        return "color"
    if modality == "CT":
        return "ct_windows"
    if modality == "MR":
        return "min_max"
    return "file_window"


def _code(ds: Dataset, keyword: str) -> str | None:
    """A coded (CS) header value, or None: anything but a short upper-case code is dropped,
    so no free text from the header can reach a prompt or a record."""
    value = str(ds.get(keyword, "") or "").strip().upper()
    return value if _CODE.match(value) else None


def _modality(ds: Dataset) -> str | None:
    return _code(ds, "Modality")


def _to_rgb_uint8(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    if frame.dtype.kind in "ui":
        bits = _int(ds, "BitsStored", frame.dtype.itemsize * 8)
        top = float(max(2**bits - 1, 1))
        if float(frame.max()) > top:
            top = float(2 ** (frame.dtype.itemsize * 8) - 1)
        return np.round(np.clip(frame / top, 0.0, 1.0) * 255.0).astype(np.uint8)
    return min_max(frame)


@dataclass(frozen=True)
class _Choice:
    recipe: str
    preset: str | None
    window: tuple[float, float] | None


def _choose(recipe: str | None, preset: str | None, window: tuple[float, float] | None) -> _Choice:
    if recipe is not None and recipe not in RECIPES:
        raise ImageError(
            f"unknown recipe '{str(recipe)[:40]}'", hint="one of " + ", ".join(RECIPES)
        )
    if preset is not None and window is not None:
        raise ImageError("give a preset or a window, not both")
    if preset is not None:
        window = preset_window(preset)
        preset = preset.lower()
    elif window is not None:
        try:
            window = (float(window[0]), float(window[1]))
        except (TypeError, ValueError, IndexError):
            raise ImageError("window must be (center, width)") from None
        if not window[1] > 0:
            raise ImageError("window width must be positive")
        preset = "custom"
    if window is not None:
        if recipe not in (None, "preset"):
            raise ImageError(f"a preset or window goes with recipe 'preset', not '{recipe}'")
        recipe = "preset"
    elif recipe == "preset":
        raise ImageError("recipe 'preset' needs a preset name or a window")
    return _Choice(recipe or "", preset, window)


def _file_notes(ds: Dataset) -> list[str]:
    """Warnings that hold for every frame of a file."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return ["burned-in annotation: text in the pixels may identify the patient"]
    return []


def prepare_dataset(
    ds: Dataset,
    *,
    recipe: str | None = None,
    preset: str | None = None,
    window: tuple[float, float] | None = None,
    frames: Sequence[int] | None = None,
    value_range: tuple[float, float] | None = None,
    label: str = "dicom",
) -> list[PreparedImage]:
    """Prepare frames of a parsed dataset (all of them unless `frames` names some).

    `value_range` fixes the min-max range for the `min_max` recipe (a volume's range).
    """
    choice = _choose(recipe, preset, window)
    count = check_image(ds)
    wanted = list(range(count)) if frames is None else list(frames)
    if any(not 0 <= i < count for i in wanted):
        raise ImageError(f"frame index out of range (the file has {count} frames)")

    modality = _modality(ds)
    transfer = _transfer_syntax(ds)
    warnings_ = _file_notes(ds)
    photometric_in = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()

    if frames is None and count > 1:
        array, photometric = _decode(ds, None)
        stack = list(array)
    else:
        stack = []
        photometric = photometric_in
        for i in wanted:
            array, photometric = _decode(ds, i if count > 1 else None)
            stack.append(array)

    results: list[PreparedImage] = []
    for i, frame in zip(wanted, stack, strict=True):
        results.append(
            _prepare_frame(
                ds,
                frame,
                choice=choice,
                photometric=photometric.upper(),
                modality=modality,
                transfer=transfer,
                frame_index=i,
                frame_count=count,
                value_range=value_range,
                warnings_=warnings_,
                label=label,
            )
        )
    return results


def decode_frame(ds: Dataset, frame: int = 0) -> tuple[np.ndarray, str]:
    """One frame's stored values (RGB for colour) and its photometric interpretation.

    The header is checked against the limits first; only this frame is decoded, so a
    volume decodes the frames it samples and no others. Pass the result to `prepare_frame`.
    """
    count = check_image(ds)
    if not 0 <= frame < count:
        raise ImageError(f"frame index out of range (the file has {count} frames)")
    return _decode(ds, frame if count > 1 else None)


def prepare_frame(
    ds: Dataset,
    frame: np.ndarray,
    *,
    photometric: str,
    frame_index: int = 0,
    recipe: str | None = None,
    preset: str | None = None,
    window: tuple[float, float] | None = None,
    value_range: tuple[float, float] | None = None,
    label: str = "dicom",
) -> PreparedImage:
    """The recipe on a frame already decoded by `decode_frame` (stored values, not HU).

    The same code path as `load_dicom`: a caller that needs the pixels before the recipe
    (a volume's min-max range) decodes each frame once. The modality LUT is applied here,
    per frame, so the kept arrays stay in their stored dtype (half the memory of float32).
    """
    choice = _choose(recipe, preset, window)
    transfer = _transfer_syntax(ds)
    return _prepare_frame(
        ds,
        frame,
        choice=choice,
        photometric=str(photometric or "").strip().upper(),
        modality=_modality(ds),
        transfer=transfer,
        frame_index=frame_index,
        frame_count=_int(ds, "NumberOfFrames", 1),
        value_range=value_range,
        warnings_=_file_notes(ds),
        label=label,
    )


def _prepare_frame(
    ds: Dataset,
    frame: np.ndarray,
    *,
    choice: _Choice,
    photometric: str,
    modality: str | None,
    transfer: UID,
    frame_index: int,
    frame_count: int,
    value_range: tuple[float, float] | None,
    warnings_: list[str],
    label: str,
) -> PreparedImage:
    notes = list(warnings_)
    extra: dict[str, Any] = {}
    rgb: np.ndarray | None = None  # colour, HxWx3
    rgbx: np.ndarray | None = None  # three windows, HxWx4 (Pillow's RGB layout)
    gray = np.zeros((0, 0), dtype=np.uint8)  # one window, for R, G and B alike
    color = photometric == "PALETTE COLOR" or (frame.ndim == 3 and frame.shape[-1] == 3)
    inverted = False
    recipe = choice.recipe or default_recipe(modality, color)
    try:
        if color:
            if choice.recipe and choice.recipe != "color":
                notes.append(f"recipe '{choice.recipe}' ignored: the image is in colour")
            recipe = "color"
            if photometric == "PALETTE COLOR":
                frame = apply_color_lut(frame, ds)
                photometric = "RGB"
            rgb = _to_rgb_uint8(frame, ds)
        else:
            if choice.recipe == "color":
                raise ImageError("recipe 'color' needs a colour image")
            values = GreyValues(frame, ds, frame_index)
            if recipe == "ct_windows":
                if modality != "CT":
                    notes.append("CT windows applied to a non-CT image")
                rescaled = "RescaleIntercept" in _rescale_source(ds, frame_index)
                if not rescaled and "ModalityLUTSequence" not in ds:
                    notes.append("no rescale in the file: stored values taken as HU")
                rgbx = values.rgbx(CT_WINDOWS)
                extra["window"] = CT_WINDOWS
            elif recipe == "preset":
                assert choice.window is not None
                center, width = choice.window
                gray = values.center_width(center, width)
                extra["window"] = (center, width)
                extra["preset"] = choice.preset
            else:
                found = _file_window(ds, values, frame_index) if recipe == "file_window" else None
                if found is not None:
                    gray, info = found
                    extra.update(info)
                else:
                    if recipe == "file_window":
                        recipe = "full_range"
                    gray = values.min_max(value_range if recipe == "min_max" else None)
                    lo, hi = value_range or values.bounds()
                    extra["window"] = (lo, hi)
                if photometric == "MONOCHROME1":
                    gray = 255 - gray
                    inverted = True
    except ImageError:
        raise
    except Exception:
        raise ImageError("DICOM pixel values could not be converted") from None

    provenance = Provenance(
        kind="dicom",
        modality=modality,
        recipe=recipe,
        window=extra.get("window"),
        preset=extra.get("preset"),
        voi_function=extra.get("voi_function"),
        photometric=photometric if _CODE.match(photometric.replace(" ", "_")) else None,
        inverted=inverted,
        frame_index=frame_index,
        frames=frame_count,
        transfer_syntax=transfer.name if transfer.is_transfer_syntax else None,
        warnings=tuple(notes),
        body_part=_code(ds, "BodyPartExamined"),
        view_position=_code(ds, "ViewPosition"),
    )
    if rgbx is not None:
        pixels = _image.square_rgbx(rgbx)
    elif rgb is not None:
        pixels = _image.square_rgb(rgb)
    else:  # one channel resized, then copied: the same bytes as resizing all three
        pixels = _image.square_gray(gray)
    return PreparedImage(pixels, source=label, provenance=provenance)


def load_dicom(
    source: str | Path | bytes | bytearray | memoryview | Dataset,
    *,
    recipe: str | None = None,
    preset: str | None = None,
    window: tuple[float, float] | None = None,
    value_range: tuple[float, float] | None = None,
) -> list[PreparedImage]:
    """One prepared 896x896 RGB image per frame, each with its `provenance`.

    recipe: "ct_windows", "preset", "file_window", "min_max" or "color"; None picks one
    from the Modality tag (CT three windows, MR min-max, others the file's window).
    preset: a CT preset name ("lung", "mediastinum", "bone", "brain", "liver");
    window: a custom (center, width) in modality units (HU for CT).
    """
    ds = source if isinstance(source, Dataset) else read_dataset(source)
    return prepare_dataset(ds, recipe=recipe, preset=preset, window=window, value_range=value_range)


def load_first_frame(data: bytes, *, label: str = "dicom") -> PreparedImage:
    """What `load_image` returns for DICOM bytes: the first frame, default recipe."""
    return prepare_dataset(_parse(data), frames=[0], label=label)[0]
