"""Reply images made to fit WeCom's inline limit: a finish reply whose `msg_item` image is over about 512 KB is
rejected (measured: WeCom keeps polling and the user sees a cut bubble), so a larger image is
recompressed as JPEG, and scaled down step by step, until it fits; one that cannot be brought under the cap (or is
not an image Pillow can read) is left out, and the caller says so in the answer's note."""

from __future__ import annotations

import io
import logging

from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

MAX_INLINE_IMAGE_BYTES = 512 * 1024  # each msg_item image, before base64
MAX_IMAGE_PIXELS = 64_000_000  # refuse to decode anything larger (a "decompression bomb")
_QUALITIES = (85, 70)
_SCALE_STEP = 0.7
_MAX_STEPS = 8
_JPEG_MAGIC, _PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


def fit_inline_image(data: bytes, limit: int = MAX_INLINE_IMAGE_BYTES) -> bytes | None:
    """`data` if it is a JPG or PNG within `limit` bytes; else the image as a JPEG within `limit`, smaller if it
    must be; None if it cannot be read or brought under `limit`."""
    if len(data) <= limit and data.startswith((_JPEG_MAGIC, _PNG_MAGIC)):
        return data
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                logger.info("left out a reply image of %dx%d pixels", opened.width, opened.height)
                return None
            image = _flattened(ImageOps.exif_transpose(opened))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        logger.info("left out a reply file that is not a readable image (%s)", type(exc).__name__)
        return None
    for _ in range(_MAX_STEPS):
        for quality in _QUALITIES:
            encoded = io.BytesIO()
            image.save(encoded, "JPEG", quality=quality, optimize=True)
            if encoded.tell() <= limit:
                return encoded.getvalue()
        size = (max(1, int(image.width * _SCALE_STEP)), max(1, int(image.height * _SCALE_STEP)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    logger.info("left out a reply image that stays over %d bytes", limit)
    return None


def _flattened(image: Image.Image) -> Image.Image:
    """The image in RGB (or L), transparency laid on white, as JPEG needs."""
    if image.mode in ("RGB", "L"):
        return image.copy()
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, "white")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
