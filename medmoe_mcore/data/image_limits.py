"""What every image reader refuses before decoding (PIL's and DICOM's alike): the errors that
name an image, and the pixel limit (--max-image-pixels)."""

from __future__ import annotations

from PIL import Image

# PIL's own decompression-bomb threshold (it refuses twice this); --max-image-pixels sets ours.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


class ImageDecodeError(ValueError):
    """An image that cannot be read; the message names its source."""


class ImageTooLargeError(ImageDecodeError):
    """More pixels than allowed (a decompression bomb, or simply too large): never decoded."""


def check_size(label: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{label}: {width} x {height} pixels, more than the limit "
                                 f"{max_pixels} (--max-image-pixels)")
