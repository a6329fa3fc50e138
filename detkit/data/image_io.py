"""Decode image files to RGB safely: EXIF orientation, every colour mode, pixel limits, clear errors."""
from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 178_956_970  # twice Pillow's warning threshold; larger files are refused

# What Pillow's decoders and EXIF parser raise on damaged input besides OSError: each plugin parses headers with
# struct, indexing and dict lookups, so the failure surfaces as whichever of these the damage reaches first.
_PARSE_ERRORS = (SyntaxError, ValueError, EOFError, struct.error, TypeError, IndexError, KeyError, OverflowError,
                 ZeroDivisionError)


class ImageDecodeError(RuntimeError):
    """An image file cannot be used: missing, corrupt, truncated, or too large. The message names the path."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image as an RGB PIL image in its displayed orientation.

    EXIF orientation is applied; an EXIF block Pillow cannot read leaves the image as stored, with a warning (the
    size check of `read_annotated_image` still catches a wrong width and height). Grayscale, palette, RGBA
    (composited on black), CMYK and 16-bit images are converted to 8-bit RGB.

    Args:
        path: the image file.
        max_pixels: refuse images whose width * height exceeds this (decompression bombs), before decoding.

    Returns:
        An RGB `PIL.Image.Image` of size (width, height) as displayed.

    Raises:
        ImageDecodeError: the file is missing, not an image, truncated, corrupt or over the pixel limit.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's global one; keep its warning from leaking to users.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageDecodeError(path, f"{width}x{height} = {width * height} pixels is over the limit of "
                                                 f"{max_pixels} (data.max_image_pixels); refusing to decode it")
                img.load()  # decode now, inside the try, so truncation is reported here
                return _to_rgb(_exif_transpose(img, path))
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not a recognised image file") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, f"refused as a decompression bomb: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's error (permissions, a folder), not Pillow's
            raise ImageDecodeError(path, f"cannot read the file ({exc.strerror})") from None
        raise ImageDecodeError(path, f"corrupt or truncated image ({exc})") from None
    except MemoryError:
        raise ImageDecodeError(path, "out of memory while decoding") from None
    except _PARSE_ERRORS as exc:
        raise ImageDecodeError(path, f"corrupt or truncated image ({_describe(exc)})") from None


def _exif_transpose(img: Image.Image, path: Path) -> Image.Image:
    """`img` in its displayed orientation; as stored, with a warning, when its EXIF block cannot be read."""
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, *_PARSE_ERRORS) as exc:
        logger.warning("%s: unreadable EXIF block (%s); using the image as stored, without EXIF orientation",
                       path, _describe(exc))
        return img


def _describe(exc: BaseException) -> str:
    """'struct.error: argument out of range' rather than 'error: ...'."""
    kind = type(exc)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"{name}: {exc}"


def read_annotated_image(path: str | Path, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`read_image`, and refuse an image whose (width, height) differs from the annotated `size`: its boxes
    would land in the wrong place."""
    image = read_image(path, max_pixels)
    if image.size != tuple(size):
        raise ImageDecodeError(path, f"decoded size {image.size[0]}x{image.size[1]} differs from the annotated "
                                     f"{size[0]}x{size[1]}; its boxes would be wrong")
    return image


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clipping
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype("uint8"), mode="L")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F
