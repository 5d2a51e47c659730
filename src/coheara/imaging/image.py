"""The neutral decoded image: 896x896 RGB uint8, as the Gemma 3 processor would make it.

Pictures (PNG, JPEG, TIFF, ...) are decoded with Pillow under `limits.current()`, checked
before any pixel is decoded, then:

- EXIF orientation applied (a phone photograph of a skin lesion or a fundus comes out
  upright); a damaged EXIF block is ignored with a warning, never a failure;
- colour kept; every mode becomes RGB as the Hugging Face Gemma 3 processor's
  `convert("RGB")` does it: alpha is dropped (a transparent pixel keeps the colour the file
  stores under it), palette, 1-bit, greyscale and CMYK (Pillow's conversion, no ICC colour
  management) expanded to RGB;
- 16-bit and 32-bit greyscale scaled from the image's own value range to 0..255, never
  clipped at 255 (which would turn most of the image white);
- resized to a square 896x896, bilinear, aspect not kept (the processor's resize).

A multi-page file (TIFF, GIF, ...) gives its first page to `load_image` and every page
to `load_pages`. Each result carries a non-identifying `Provenance` saying what was done.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from coheara import model_facts
from coheara.errors import ImageError
from coheara.imaging import limits

ImageSource = str | Path | bytes | bytearray | memoryview | np.ndarray | Image.Image
"""What the loaders accept (besides a `PreparedImage`, passed through as it is)."""

_ORIENTATIONS = {
    2: "mirrored left to right",
    3: "rotated 180 degrees",
    4: "mirrored top to bottom",
    5: "transposed",
    6: "rotated 90 degrees clockwise",
    7: "transversed",
    8: "rotated 90 degrees counter-clockwise",
}
"""EXIF orientation values and what `ImageOps.exif_transpose` does to make them upright."""

_HIGH_DEPTH = {
    "I;16": "16-bit",
    "I;16L": "16-bit",
    "I;16B": "16-bit",
    "I;16N": "16-bit",
    "I": "32-bit integer",
    "F": "32-bit float",
}
"""Pillow modes whose values `convert("RGB")` would clip at 255: scaled instead."""

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError)
"""What Pillow raises on a truncated or malformed file (besides its own bomb error)."""


@dataclass(frozen=True)
class Provenance:
    """What was done to an image: non-identifying fields only.

    Never a patient name, ID, date, institution or file name: only codes (modality,
    photometric interpretation, transfer syntax, picture format and mode), the recipe and
    window applied, the frame or page, and warnings written by Coheara itself.
    """

    kind: str
    """"dicom", "picture" (a decoded file or PIL image) or "array" (a numpy array)."""
    recipe: str
    """DICOM: "ct_windows", "min_max", ...; pictures: "square_resize" (colours kept) or
    "min_max" (a 16/32-bit image scaled from its value range, given in `window`)."""
    modality: str | None = None
    window: Any = None
    preset: str | None = None
    voi_function: str | None = None
    photometric: str | None = None
    inverted: bool = False
    frame_index: int = 0
    """0-based frame (DICOM) or page (TIFF, GIF) this image comes from."""
    frames: int = 1
    """Frames or pages the file holds."""
    transfer_syntax: str | None = None
    warnings: tuple[str, ...] = ()
    source_format: str | None = None
    """Picture file format as Pillow names it ("PNG", "JPEG", "TIFF")."""
    source_mode: str | None = None
    """Pillow mode of the decoded picture before conversion ("RGB", "I;16", "CMYK", "P")."""
    orientation: int | None = None
    """EXIF orientation applied (2..8); None when the picture was upright as stored."""
    body_part: str | None = None
    """DICOM BodyPartExamined, a code (e.g. "CHEST"); free text is dropped."""
    view_position: str | None = None
    """DICOM ViewPosition, a code (e.g. "PA", "AP", "LL")."""

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """Pixels ready for the model; `source` is a non-identifying label (never a file name)."""

    pixels: np.ndarray
    source: str = "image"
    provenance: Provenance | None = None
    _png: list[bytes] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        side = model_facts.IMAGE_SIZE
        if self.pixels.shape != (side, side, 3) or self.pixels.dtype != np.uint8:
            raise ImageError(
                f"prepared image must be {side}x{side}x3 uint8, got "
                f"{'x'.join(map(str, self.pixels.shape))} {self.pixels.dtype}"
            )

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.pixels, mode="RGB")

    def png_bytes(self) -> bytes:
        """Encoded once, then reused by every wire that needs it."""
        if not self._png:
            buffer = io.BytesIO()
            self.to_pil().save(buffer, format="PNG", compress_level=1)
            self._png.append(buffer.getvalue())
        return self._png[0]

    def base64_png(self) -> str:
        return base64.b64encode(self.png_bytes()).decode("ascii")

    def data_uri(self) -> str:
        return "data:image/png;base64," + self.base64_png()


def square_rgb(array: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 to the model's square: bilinear, aspect not kept, as the Gemma 3 processor.

    A resized result is read-only (numpy's view of Pillow's bytes, not copied again): a
    `PreparedImage` is never written to.
    """
    side = model_facts.IMAGE_SIZE
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8 or array.size == 0:
        raise ImageError("image must be a non-empty HxWx3 uint8 array")
    if array.shape[:2] == (side, side):
        return np.ascontiguousarray(array)
    resized = Image.fromarray(np.ascontiguousarray(array), mode="RGB").resize(
        (side, side), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.uint8)


def square_rgbx(packed: np.ndarray) -> np.ndarray:
    """HxWx4 uint8 whose fourth byte is padding (Pillow's own RGB layout) to the model's
    square: `square_rgb` of its first three channels, byte for byte, without the
    repacking (Pillow reads the four bytes of each pixel as they are)."""
    side = model_facts.IMAGE_SIZE
    if packed.ndim != 3 or packed.shape[-1] != 4 or packed.dtype != np.uint8 or packed.size == 0:
        raise ImageError("image must be a non-empty HxWx4 uint8 array")
    if packed.shape[:2] == (side, side):
        return np.ascontiguousarray(packed[..., :3])
    height, width = packed.shape[:2]
    image = Image.frombytes("RGB", (width, height), np.ascontiguousarray(packed), "raw", "RGBX")
    return np.asarray(image.resize((side, side), Image.Resampling.BILINEAR), dtype=np.uint8)


def square_gray(gray: np.ndarray) -> np.ndarray:
    """HxW uint8 grey to the model's square RGB: `square_rgb` of the grey in all three
    channels, byte for byte, for a third of the work.

    Pillow's bilinear resize treats each channel on its own with the same weights and the
    same rounding, so one channel is resized and then copied to R, G and B.
    """
    side = model_facts.IMAGE_SIZE
    if gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
        raise ImageError("image must be a non-empty HxW uint8 array")
    if gray.shape != (side, side):
        gray = np.asarray(
            Image.fromarray(np.ascontiguousarray(gray), mode="L").resize(
                (side, side), Image.Resampling.BILINEAR
            ),
            dtype=np.uint8,
        )
    return np.stack([gray, gray, gray], axis=-1)


# ------------------------------------------------------------------------ entry points


def load_image(
    source: ImageSource | PreparedImage,
    *,
    label: str = "image",
) -> PreparedImage:
    """Decode a file path, raw bytes, a base64 string or data URI, an array or a PIL image.

    A multi-page file gives its first page, with a warning that the others were ignored
    (`load_pages` reads them all); DICOM gives its first frame (`load_dicom` for all).
    """
    if isinstance(source, PreparedImage):
        return source
    if isinstance(source, Image.Image):
        return _picture(source, label)
    if isinstance(source, np.ndarray):
        return _from_array(source, label)
    return _decode_bytes(source_bytes(source, label), label)


def load_pages(
    source: ImageSource | PreparedImage,
    *,
    max_pages: int | None = None,
    label: str = "image",
) -> list[PreparedImage]:
    """Every page of a multi-page picture (TIFF, GIF, ...) in file order, each prepared as
    `load_image` prepares one; a one-page picture or an array gives a list of one.

    Every page's size is checked against `limits.current().max_pixels` (and all pages
    together against it too) before any page is decoded; a file with more pages than
    `max_frames` is refused. max_pages: read only the first pages, with a warning on each
    saying how many the file holds. DICOM bytes or files give their frames (`load_dicom`).
    """
    if max_pages is not None and max_pages < 1:
        raise ImageError("max_pages must be at least 1")
    if isinstance(source, PreparedImage):
        return [source]
    if isinstance(source, np.ndarray):
        return [_from_array(source, label)]
    if isinstance(source, Image.Image):
        return _pages(source, label, max_pages)
    data = source_bytes(source, label)
    if not data:
        raise ImageError("image is empty")
    from coheara.imaging import dicom  # pydicom loads only when DICOM arrives

    if dicom.looks_like_dicom(data):
        frames = dicom.load_dicom(data)
        if max_pages is None or len(frames) <= max_pages:
            return frames
        note = f"DICOM has {len(frames)} frames; the first {max_pages} were read"
        return [_with_warning(frame, note) for frame in frames[:max_pages]]
    with open_picture(data) as image:
        return _pages(image, label, max_pages)


def decode_base64_image(data: str, *, label: str = "image") -> PreparedImage:
    """Base64 or a base64 data URI only: what a server accepts, never a path or a URL."""
    return _decode_bytes(base64_bytes(data, label), label)


def decode_rgb(source: ImageSource, *, label: str = "image") -> tuple[Image.Image, Provenance]:
    """The first page at full resolution, upright and RGB, with what was done (no resize).

    For callers that cut the picture themselves (`coheara.imaging.tiles`). DICOM is
    refused: its pixels need a recipe (`load_dicom`).
    """
    if isinstance(source, np.ndarray):
        array, recipe, window, notes = _array_rgb(source)
        prov = Provenance(kind="array", recipe=recipe, window=window, warnings=tuple(notes))
        return Image.fromarray(array, mode="RGB"), prov
    if isinstance(source, Image.Image):
        return _upright_rgb(source)
    data = source_bytes(source, label)
    if not data:
        raise ImageError("image is empty")
    from coheara.imaging.dicom import looks_like_dicom

    if looks_like_dicom(data):
        raise ImageError("DICOM input cannot be used here", hint="use load_dicom")
    with open_picture(data) as image:
        pages = _count_pages(image, limits.current().max_frames)
        upright, provenance = _upright_rgb(image, pages=pages, notes=_first_page_notes(pages))
        upright.load()  # decoded while the file is open: the caller gets pixels, not a closed file
        return upright, provenance


# ------------------------------------------------------------------------ reading inputs


def source_bytes(source: str | Path | bytes | bytearray | memoryview, label: str) -> bytes:
    """The encoded bytes of a path, a base64 string or data URI, or bytes (nothing decoded)."""
    if isinstance(source, Path):
        return read_file(source, limits.current().max_image_bytes, dicom_allowed=True)
    if isinstance(source, str):
        text = source.strip()
        if text.startswith("data:"):
            return base64_bytes(text, label)
        if _is_file(text):
            return read_file(Path(text), limits.current().max_image_bytes, dicom_allowed=True)
        try:
            return base64_bytes(text, label)
        except ImageError as exc:
            if "base64" not in exc.message:
                raise
            raise ImageError(f"{label} is neither a readable file nor valid base64") from None
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    raise ImageError(f"unsupported image input type {type(source).__name__}")


@contextmanager
def file_errors() -> Iterator[None]:
    """A file that cannot be read as one line that never quotes its path."""
    try:
        yield
    except FileNotFoundError:
        raise ImageError("image file not found", hint="check the path") from None
    except IsADirectoryError:
        raise ImageError("image path is a folder, not a file") from None
    except OSError as exc:
        raise ImageError(f"cannot read image file: {exc.strerror}") from None


def read_file(path: Path, limit: int, *, dicom_allowed: bool = False) -> bytes:
    """A file's bytes, refused over `limit` (a DICOM may use the DICOM limit instead)."""
    with file_errors():
        if path.stat().st_size > limit and not (dicom_allowed and _file_is_dicom(path)):
            raise ImageError(f"image file is larger than {limit} bytes")
        return path.read_bytes()


def _file_is_dicom(path: Path) -> bool:
    """A large file may still be a multi-frame DICOM, read up to the DICOM size limit."""
    from coheara.imaging.dicom import looks_like_dicom

    if path.stat().st_size > limits.current().max_dicom_bytes:
        return False
    with path.open("rb") as handle:
        return looks_like_dicom(handle.read(132))


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).is_file()
    except (OSError, ValueError):  # a long base64 string is no valid file name
        return False


def base64_bytes(data: str, label: str) -> bytes:
    """Base64 or a base64 data URI to bytes; never a path or a URL (what a server accepts)."""
    text = data.strip()
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ImageError(f"{label}: a data URI must be base64-encoded")
    elif text.startswith(("http://", "https://", "file:")):
        raise ImageError(
            f"{label}: remote or file URLs are not fetched", hint="send the image as base64"
        )
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{label} is not valid base64") from None


@contextmanager
def open_picture(data: bytes) -> Iterator[Image.Image]:
    """Pillow's lazy image of `data` (nothing decoded yet), under the byte limit; decoding
    errors inside the block become one-line `ImageError`s."""
    most = limits.current()
    if len(data) > most.max_image_bytes:
        raise ImageError(f"image is larger than {most.max_image_bytes} bytes")
    # Our own checks run before decoding; Pillow's is a second line of defence.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, most.max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixels(image.width, image.height)
            yield image
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image has more than {most.max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise ImageError("image is not in a supported format") from None
    except _DECODE_ERRORS:
        raise ImageError("image data is truncated or corrupt") from None


def check_pixels(width: int, height: int) -> None:
    """Refuse an empty image, or one over `max_pixels`, from its header alone."""
    if width <= 0 or height <= 0:
        raise ImageError("image has zero size")
    most = limits.current().max_pixels
    if width * height > most:
        raise ImageError(f"image has more than {most} pixels")


def _count_pages(image: Image.Image, most: int) -> int:
    """Pages in the file, counted up to `most` + 1 from headers only, back on the first.

    MPO (a phone's JPEG) counts as one: its further frames are previews or depth maps.
    """
    if not getattr(image, "is_animated", False) or image.format == "MPO":
        return 1
    if image.format != "TIFF":
        return min(int(getattr(image, "n_frames", 1)), most + 1)
    count = 1
    try:
        while count <= most:
            image.seek(count)  # reads the next page's tags (IFD), not its pixels
            count += 1
    except EOFError:
        pass
    image.seek(0)
    return count


# ------------------------------------------------------------------------ decoding


def _decode_bytes(data: bytes, label: str) -> PreparedImage:
    if not data:
        raise ImageError("image is empty")
    from coheara.imaging import dicom  # pydicom loads only when DICOM arrives

    if dicom.looks_like_dicom(data):
        return dicom.load_first_frame(data, label=label)
    with open_picture(data) as image:
        pages = _count_pages(image, limits.current().max_frames)
        return _picture(image, label, pages=pages, notes=_first_page_notes(pages))


def _first_page_notes(pages: int) -> list[str]:
    """The warning a first page carries when the file holds more."""
    if pages <= 1:
        return []
    most = limits.current().max_frames
    count = f"more than {most}" if pages > most else str(pages)
    return [f"image has {count} pages; only the first was used, the others were ignored"]


def _pages(image: Image.Image, label: str, max_pages: int | None) -> list[PreparedImage]:
    most = limits.current()
    start = image.tell()
    try:
        count = _count_pages(image, most.max_frames)
        if count > most.max_frames:
            raise ImageError(f"image has more than {most.max_frames} pages")
        take = count if max_pages is None else min(count, max_pages)
        total = 0
        for page in range(take):  # every page's header checked before any is decoded
            image.seek(page)
            check_pixels(image.width, image.height)
            total += image.width * image.height
            if total > most.max_pixels:
                raise ImageError(f"image pages hold more than {most.max_pixels} pixels in all")
        notes = [f"image has {count} pages; the first {take} were read"] if take < count else []
        out = []
        for page in range(take):
            image.seek(page)
            out.append(_picture(image, label, page=page, pages=count, notes=notes))
        return out
    finally:
        image.seek(start)


def _picture(
    image: Image.Image,
    label: str,
    *,
    page: int = 0,
    pages: int = 1,
    notes: list[str] | None = None,
) -> PreparedImage:
    """One decoded page: upright, RGB, then the processor's square resize."""
    picture, provenance = _upright_rgb(image, page=page, pages=pages, notes=notes, grey=True)
    side = model_facts.IMAGE_SIZE
    if picture.size != (side, side):
        # Square resize without keeping the aspect ratio, bilinear: what the Gemma 3
        # image processor does, so every runtime sees the same pixels.
        picture = picture.resize((side, side), Image.Resampling.BILINEAR)
    pixels = np.asarray(picture, dtype=np.uint8)  # Pillow's bytes, read-only: not copied again
    if picture.mode == "L":
        # A grey picture is resized as one channel, then copied to R, G and B: the same
        # bytes as resizing its RGB conversion (see `square_gray`), for a third of the work.
        pixels = np.stack([pixels, pixels, pixels], axis=-1)
    return PreparedImage(pixels, source=label, provenance=provenance)


def _upright_rgb(
    image: Image.Image,
    *,
    page: int = 0,
    pages: int = 1,
    notes: list[str] | None = None,
    grey: bool = False,
) -> tuple[Image.Image, Provenance]:
    """The page upright and in RGB (grey: a grey page stays one "L" channel)."""
    check_pixels(image.width, image.height)
    mode, fmt = image.mode, image.format
    upright, orientation, orient_notes = _orient(image)
    rgb, recipe, window, tone_notes = _to_rgb(upright, grey=grey)
    provenance = Provenance(
        kind="picture",
        recipe=recipe,
        window=window,
        frame_index=page,
        frames=pages,
        warnings=(*(notes or ()), *orient_notes, *tone_notes),
        source_format=fmt if fmt and fmt.isalnum() else None,
        source_mode=mode,
        orientation=orientation,
    )
    return rgb, provenance


def _orient(image: Image.Image) -> tuple[Image.Image, int | None, list[str]]:
    """Apply the EXIF orientation; a damaged EXIF block leaves the image as stored."""
    damaged = "EXIF block is damaged; orientation not applied, image used as stored"
    raw = image.info.get("exif")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if isinstance(raw, bytes):
                # Parsed afresh: Pillow may have read it on open (JPEG) and kept quiet since.
                exif = Image.Exif()
                exif.load(raw)
            else:
                exif = image.getexif()  # TIFF tags: read with the page
            value = exif.get(ExifTags.Base.Orientation)
    except Exception:  # any malformed EXIF: the picture itself is still good
        return image, None, [damaged]
    damage = [w for w in caught if issubclass(w.category, UserWarning)]
    notes = ["EXIF block is partly damaged"] if damage else []
    if value is None or value == 1:
        return image, None, notes
    if value not in _ORIENTATIONS:
        return image, None, [*notes, "EXIF orientation value is invalid; image used as stored"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            upright = ImageOps.exif_transpose(image)
    except Exception:
        return image, None, [damaged]
    return upright, value, [*notes, f"EXIF orientation {value} applied ({_ORIENTATIONS[value]})"]


def _to_rgb(image: Image.Image, *, grey: bool = False) -> tuple[Image.Image, str, Any, list[str]]:
    """RGB as the Gemma 3 processor's `convert("RGB")`, but high bit depths scaled.

    grey: a grey image ("L", or a high bit depth once scaled) comes back as one "L" channel,
    which `convert("RGB")` would only copy to R, G and B.
    """
    mode = image.mode
    if mode in _HIGH_DEPTH:
        # Pillow clips 16-bit and float pixels to 255 on convert("RGB"): scale them instead.
        gray, lo, hi, notes = _min_max(np.asarray(image), f"{_HIGH_DEPTH[mode]} image")
        channels = gray if grey else np.stack([gray] * 3, axis=-1)
        return Image.fromarray(channels, mode="L" if grey else "RGB"), "min_max", (lo, hi), notes
    notes = []
    if "A" in mode or "a" in mode:
        alpha = image.getchannel("A" if "A" in mode else "a")
        if alpha.getextrema()[0] < 255:  # type: ignore[operator]
            notes.append("alpha channel dropped (as the Gemma 3 processor's RGB conversion)")
    elif "transparency" in image.info:
        notes.append("transparency dropped (as the Gemma 3 processor's RGB conversion)")
    if mode == "CMYK":
        notes.append("CMYK converted to RGB without colour management")
    if mode == "RGB" or (grey and mode == "L"):
        return image, "square_resize", None, notes
    try:
        rgb = image.convert("RGB")
    except ValueError:
        try:  # a premultiplied mode ("La", "RGBa") has no direct conversion
            rgb = image.convert("RGBA").convert("RGB")
        except ValueError:
            raise ImageError(f"image colour mode {mode[:8]} is not supported") from None
    return rgb, "square_resize", None, notes


def _min_max(values: np.ndarray, what: str) -> tuple[np.ndarray, float, float, list[str]]:
    """One min-max over the values (finite ones) to 0..255 uint8, with the note saying so."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise ImageError("image holds no finite values")
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if not finite.all():
        values = np.where(finite, values, lo)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    scaled = ((values - lo) * scale).round().astype(np.uint8)
    if hi > lo:
        note = f"{what} scaled from its full range {lo:g}..{hi:g} to 0..255"
    else:
        note = f"{what} holds the single value {lo:g}; shown black"
    return scaled, lo, hi, [note]


def _array_rgb(source: np.ndarray, *, grey: bool = False) -> tuple[np.ndarray, str, Any, list[str]]:
    """HxW, HxWx3 or HxWx4 numbers to HxWx3 uint8 (not resized); alpha dropped.

    grey: a one-channel array comes back as HxW (for `square_gray`), not copied to three.
    """
    array = source
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.size == 0:
        raise ImageError("array image must be HxW, HxWx3 or HxWx4")
    if array.dtype.kind not in "biuf":
        raise ImageError(f"array image must hold numbers, not {array.dtype.kind} values")
    notes = []
    if array.shape[-1] == 4:
        alpha = array[..., 3]
        if alpha.min() < (255 if array.dtype == np.uint8 else alpha.max()):
            notes.append("alpha channel dropped (as the Gemma 3 processor's RGB conversion)")
        array = array[..., :3]
    recipe, window = "square_resize", None
    if array.dtype != np.uint8:
        array, lo, hi, scaled = _min_max(array, f"{array.dtype} array")
        recipe, window = "min_max", (lo, hi)
        notes += scaled
    if array.shape[-1] == 1:
        array = array[..., 0] if grey else np.concatenate([array] * 3, axis=-1)
    return np.ascontiguousarray(array), recipe, window, notes


def _from_array(source: np.ndarray, label: str) -> PreparedImage:
    array, recipe, window, notes = _array_rgb(source, grey=True)
    provenance = Provenance(kind="array", recipe=recipe, window=window, warnings=tuple(notes))
    pixels = square_gray(array) if array.ndim == 2 else square_rgb(array)
    return PreparedImage(pixels, source=label, provenance=provenance)


def _with_warning(image: PreparedImage, note: str) -> PreparedImage:
    provenance = image.provenance or Provenance(kind="picture", recipe="square_resize")
    provenance = replace(provenance, warnings=(*provenance.warnings, note))
    return PreparedImage(image.pixels, source=image.source, provenance=provenance)
