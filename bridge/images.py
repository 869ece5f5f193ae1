"""WebP encoding for results: what the horde stores and what R2 uploads carry."""

from __future__ import annotations

import base64
import io

from PIL import Image

RESULT_QUALITY = 95  # the legacy worker's quality for uploaded results


def encode_webp(image: Image.Image, *, quality: int = RESULT_QUALITY, lossless: bool = False) -> bytes:
    """The image as WebP bytes. Modes WebP cannot hold are converted, keeping alpha where there is one."""
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be 0-100, got {quality}")
    if image.mode not in ("RGB", "RGBA"):
        has_alpha = image.mode in ("LA", "PA", "RGBa", "La") or (
            image.mode == "P" and "transparency" in image.info
        )
        image = image.convert("RGBA" if has_alpha else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=quality, lossless=lossless, method=4)
    return buffer.getvalue()


def encode_webp_base64(image: Image.Image, *, quality: int = RESULT_QUALITY) -> str:
    """Base64 WebP for a submit's `generation` when no R2 upload is possible."""
    return base64.b64encode(encode_webp(image, quality=quality)).decode("ascii")
