"""Images, converted once to the neutral form every backend encodes for its own wire."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coheara.imaging.image import PreparedImage, Provenance, decode_base64_image, load_image
from coheara.imaging.prepare import Prepared, prepare

if TYPE_CHECKING:
    from coheara.imaging.dicom import load_dicom
    from coheara.imaging.volume import Volume, load_volume

__all__ = [
    "Prepared",
    "PreparedImage",
    "Provenance",
    "Volume",
    "decode_base64_image",
    "load_dicom",
    "load_image",
    "load_volume",
    "prepare",
]


def __getattr__(name: str) -> Any:
    # pydicom takes about half a second to import: load it only when DICOM is asked for.
    if name == "load_dicom":
        from coheara.imaging.dicom import load_dicom

        return load_dicom
    if name in ("Volume", "load_volume"):
        from coheara.imaging import volume

        return getattr(volume, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
