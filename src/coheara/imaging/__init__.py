"""Images, converted once to the neutral form every backend encodes for its own wire."""

from coheara.imaging.image import PreparedImage, load_image

__all__ = ["PreparedImage", "load_image"]
