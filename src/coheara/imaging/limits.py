"""The limits every image input is held to, checked before any pixel is decoded.

One frozen `ImageLimits`, read by every loader through `current()`. The defaults
suit a workstation; a site sets its own through settings (`Settings.image_limits()`),
and `applied(limits)` puts them in force for one call (a context variable, so
concurrent requests in one server cannot see each other's limits).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from coheara.errors import ImageError, RequestTooLargeError


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int = 64 * 1024 * 1024
    """Largest picture file (PNG, JPEG, TIFF, ...) or decoded base64 payload."""
    max_dicom_bytes: int = 512 * 1024 * 1024
    """Largest DICOM file: a multi-frame file may be larger than any picture."""
    max_pixels: int = 50_000 * 50_000 // 4
    """Most pixels (x samples) one image, one file's frames in all, or one volume may hold."""
    max_frames: int = 2_000
    """Most frames one DICOM file may declare."""
    max_series_files: int = 2_000
    """Most files one series folder (or list) may hold; counted before any is read."""
    max_images: int = 128
    """Most images one request may send to the model (an 85-slice volume, 126 tiles fit)."""

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) < 1:
                raise ImageError(f"image limit {name} must be at least 1")


DEFAULT_LIMITS = ImageLimits()

_current: ContextVar[ImageLimits] = ContextVar("coheara_image_limits", default=DEFAULT_LIMITS)


def current() -> ImageLimits:
    """The limits in force for this call (the defaults unless `applied` says otherwise)."""
    return _current.get()


@contextmanager
def applied(limits: ImageLimits | None) -> Iterator[ImageLimits]:
    """Put `limits` in force inside the block (None keeps the ones already in force)."""
    if limits is None:
        yield current()
        return
    token = _current.set(limits)
    try:
        yield limits
    finally:
        _current.reset(token)


def check_image_count(count: int) -> None:
    """Refuse a request with more images than the model may be sent (before decoding them):
    a 413, like any request over a deployment limit."""
    most = current().max_images
    if count > most:
        raise RequestTooLargeError(
            f"the request holds {count} images; at most {most} are allowed",
            hint="send fewer images, sample the series, or raise COHEARA_MAX_IMAGES",
        )
