"""Images, converted once to the neutral form every backend encodes for its own wire."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coheara.imaging.image import PreparedImage, Provenance, decode_base64_image, load_image

if TYPE_CHECKING:
    from coheara.imaging.dicom import load_dicom

__all__ = ["PreparedImage", "Provenance", "decode_base64_image", "load_dicom", "load_image"]


def __getattr__(name: str) -> Any:
    # pydicom takes about half a second to import: load it only when DICOM is asked for.
    if name == "load_dicom":
        from coheara.imaging.dicom import load_dicom

        return load_dicom
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
