"""Image in, mask out: the pre- and post-processing of segmentation-style models.

A model's manifest ``extra`` says what its input expects (see models/zoo.py):
``input_size`` [H, W] to stretch to, or ``size_multiple``/``limit_side_len`` to keep the
aspect ratio; ``layout`` NHWC or NCHW; ``color`` RGB or BGR; ``scale``, ``mean``, ``std``
for ``(pixel * scale - mean) / std``; ``threshold`` for the mask. Pillow (the ``image``
extra) decodes and resizes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np


class ImageError(ValueError):
    """An image that cannot be decoded or does not fit the model."""


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImageError("image handling needs Pillow: pip install 'epara[image]'") from exc
    return Image


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Encoded bytes (JPEG, PNG, ...) or a uint8 [H, W, 3] array → uint8 RGB [H, W, 3]."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 3 or data.shape[2] != 3:
            raise ImageError(f"an image tensor must be uint8 [H, W, 3] RGB, got "
                             f"{data.dtype.name}{list(data.shape)}")
        return data
    image_module = _pil()
    try:
        with image_module.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, image_module.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode the image: {exc}") from None


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    image_module = _pil()
    return np.asarray(image_module.fromarray(rgb).resize((width, height),
                                                         image_module.BILINEAR))


def model_input_size(shape: tuple[int, int], extra: Mapping[str, Any]) -> tuple[int, int]:
    """The (H, W) the model is fed for an image of ``shape`` (H, W)."""
    if extra.get("input_size"):
        height, width = extra["input_size"]
        return int(height), int(width)
    height, width = shape
    limit = extra.get("limit_side_len")
    if limit:
        side = max(height, width) if extra.get("limit_type", "max") == "max" \
            else min(height, width)
        grow = extra.get("limit_type", "max") != "max"
        if (side > limit) != grow:
            ratio = limit / side
            height, width = height * ratio, width * ratio
    multiple = int(extra.get("size_multiple", 1))
    height = max(multiple, round(height / multiple) * multiple)
    width = max(multiple, round(width / multiple) * multiple)
    return height, width


def preprocess(rgb: np.ndarray, extra: Mapping[str, Any], dtype: str = "float32") -> np.ndarray:
    """uint8 RGB [H, W, 3] → the model's input tensor with a batch axis of 1."""
    height, width = model_input_size(rgb.shape[:2], extra)
    pixels = _resize(rgb, height, width)
    if extra.get("color", "RGB") == "BGR":
        pixels = pixels[..., ::-1]
    x = pixels.astype(np.float32) * float(extra.get("scale", 1 / 255))
    x = (x - np.asarray(extra.get("mean", [0, 0, 0]), np.float32)) \
        / np.asarray(extra.get("std", [1, 1, 1]), np.float32)
    if extra.get("layout", "NHWC") == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[np.newaxis].astype(dtype))


def probability_map(output: np.ndarray, extra: Mapping[str, Any]) -> np.ndarray:
    """The model's output for one image → float32 [h, w] probabilities."""
    value = np.asarray(output, dtype=np.float32)
    if value.ndim == 4:
        value = value[0]
    if value.ndim == 3:
        channel_first = extra.get("layout", "NHWC") == "NCHW"
        value = value[0] if channel_first else value[..., 0]
    if value.ndim != 2:
        raise ImageError(f"cannot read a mask from an output of shape {list(output.shape)}")
    return value


def mask_for_image(probabilities: np.ndarray, shape: tuple[int, int],
                   threshold: float) -> np.ndarray:
    """Probabilities at model resolution → uint8 mask (0 or 255) at the image's size."""
    height, width = shape
    probability = np.clip(probabilities, 0.0, 1.0)
    scaled = (probability * 255).astype(np.uint8)
    if scaled.shape != (height, width):
        image_module = _pil()
        scaled = np.asarray(image_module.fromarray(scaled).resize((width, height),
                                                                  image_module.BILINEAR))
    return np.where(scaled >= threshold * 255, 255, 0).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    _pil().fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 200, 80),
            alpha: float = 0.5) -> np.ndarray:
    """The image with the mask's area tinted, for people to look at."""
    tinted = rgb.astype(np.float32)
    selected = mask > 0
    tinted[selected] = (1 - alpha) * tinted[selected] + alpha * np.asarray(color, np.float32)
    return tinted.astype(np.uint8)
