"""Images, converted once to the neutral form every backend encodes for its own wire."""

from coheara.imaging.image import PreparedImage, decode_base64_image, load_image

__all__ = ["PreparedImage", "decode_base64_image", "load_image"]
