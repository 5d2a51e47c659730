"""The neutral decoded image: 896x896 RGB uint8, as the Gemma 3 processor would make it."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from coheara import model_facts
from coheara.errors import ImageError
from coheara.imaging import limits


@dataclass(frozen=True)
class Provenance:
    """What was done to an image: non-identifying fields only.

    Never a patient name, ID, date, institution or file name: only codes (modality,
    photometric interpretation, transfer syntax), the recipe and window applied, the
    frame, and warnings written by Coheara itself.
    """

    kind: str
    recipe: str
    modality: str | None = None
    window: Any = None
    preset: str | None = None
    voi_function: str | None = None
    photometric: str | None = None
    inverted: bool = False
    frame_index: int = 0
    frames: int = 1
    transfer_syntax: str | None = None
    warnings: tuple[str, ...] = ()

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
    """HxWx3 uint8 to the model's square: bilinear, aspect not kept, as the Gemma 3 processor."""
    side = model_facts.IMAGE_SIZE
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8 or array.size == 0:
        raise ImageError("image must be a non-empty HxWx3 uint8 array")
    if array.shape[:2] == (side, side):
        return np.ascontiguousarray(array)
    resized = Image.fromarray(np.ascontiguousarray(array), mode="RGB").resize(
        (side, side), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.uint8).copy()


def _from_pil(image: Image.Image, source: str) -> PreparedImage:
    side = model_facts.IMAGE_SIZE
    if image.width == 0 or image.height == 0:
        raise ImageError("image has zero size")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # Pillow clips 16-bit and float pixels to 255 on convert("RGB"): scale them instead.
        return load_image(np.asarray(image), label=source)
    rgb = image.convert("RGB")
    if rgb.size != (side, side):
        # Square resize without keeping the aspect ratio, bilinear: what the Gemma 3
        # image processor does, so every runtime sees the same pixels.
        rgb = rgb.resize((side, side), Image.Resampling.BILINEAR)
    return PreparedImage(np.asarray(rgb, dtype=np.uint8).copy(), source=source)


def load_image(
    source: str | Path | bytes | np.ndarray | Image.Image | PreparedImage,
    *,
    label: str = "image",
) -> PreparedImage:
    """Decode a file path, raw bytes, a base64 string or data URI, an array or a PIL image."""
    if isinstance(source, PreparedImage):
        return source
    if isinstance(source, Image.Image):
        return _from_pil(source, label)
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.size == 0:
            raise ImageError("array image must be HxW, HxWx3 or HxWx4")
        if array.dtype != np.uint8:
            lo, hi = float(array.min()), float(array.max())
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            array = ((array.astype(np.float64) - lo) * scale).round().astype(np.uint8)
        return _from_pil(Image.fromarray(array[..., :3]), label)
    if isinstance(source, Path):
        data = read_file(source, limits.current().max_image_bytes, dicom_allowed=True)
        return _decode_bytes(data, label)
    if isinstance(source, str):
        text = source.strip()
        if text.startswith("data:"):
            return decode_base64_image(text, label=label)
        if _is_file(text):
            return load_image(Path(text), label=label)
        try:
            return decode_base64_image(text, label=label)
        except ImageError as exc:
            if "base64" not in exc.message:
                raise
            raise ImageError(f"{label} is neither a readable file nor valid base64") from None
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode_bytes(bytes(source), label)
    raise ImageError(f"unsupported image input type {type(source).__name__}")


def read_file(path: Path, limit: int, *, dicom_allowed: bool = False) -> bytes:
    """A file's bytes, refused over `limit` (a DICOM may use the DICOM limit instead)."""
    try:
        if path.stat().st_size > limit and not (dicom_allowed and _file_is_dicom(path)):
            raise ImageError(f"image file is larger than {limit} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError("image file not found", hint="check the path") from None
    except IsADirectoryError:
        raise ImageError("image path is a folder, not a file") from None
    except OSError as exc:
        raise ImageError(f"cannot read image file: {exc.strerror}") from None


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


def decode_base64_image(data: str, *, label: str = "image") -> PreparedImage:
    """Base64 or a base64 data URI only: what a server accepts, never a path or a URL."""
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
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{label} is not valid base64") from None
    return _decode_bytes(raw, label)


def _decode_bytes(data: bytes, label: str) -> PreparedImage:
    if not data:
        raise ImageError("image is empty")
    from coheara.imaging import dicom  # pydicom loads only when DICOM arrives

    if dicom.looks_like_dicom(data):
        return dicom.load_first_frame(data, label=label)
    most = limits.current()
    if len(data) > most.max_image_bytes:
        raise ImageError(f"image is larger than {most.max_image_bytes} bytes")
    # Our own check below runs before decoding; Pillow's is a second line of defence.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, most.max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > most.max_pixels:
                raise ImageError(f"image has more than {most.max_pixels} pixels")
            image.load()
            return _from_pil(image, label)
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageError(f"image has more than {most.max_pixels} pixels") from None
        raise ImageError("image is not in a supported format") from None
    except (OSError, ValueError, SyntaxError):
        raise ImageError("image data is truncated or corrupt") from None
