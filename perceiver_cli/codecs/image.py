"""Image codec: an RGB image as its raw channel bytes in raster order, one token per byte.

Based on the ImageNet 64×64 setup of Perceiver AR (Hawthorne et al. 2022, section 5.1), which follows the
channel-by-channel raster order of Image Transformer / Sparse Transformer: each pixel becomes three tokens R, G, B,
row by row, and the 256 byte values plus BOS are the whole vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from perceiver_cli.codecs.base import Codec, CodecError, atomic_write, build_ranges, check_file, register_codec

CHANNELS = "RGB"
MISSING_GREY = 128  # pixels a partial sequence has not reached yet
WHITE = (255, 255, 255)

ImageSource = str | os.PathLike | Image.Image | np.ndarray


@register_codec
class ImageCodec(Codec):
    """Fixed-size RGB images as height × width × 3 byte tokens."""

    name = "image"

    def __init__(self, height: int = 32, width: int = 32):
        for key, value in (("height", height), ("width", width)):
            if not (isinstance(value, int) and 1 <= value <= 4096):
                raise CodecError(f"image codec: {key}={value!r} is outside [1, 4096]")
        self.height, self.width = height, width
        self.ranges = build_ranges([("VALUE", 256), ("BOS", 1)])
        self.value = self.ranges[0]
        self.bos_id = self.ranges[1].first
        self.eos_id = None
        self.last_notice: str | None = None  # what prepare_image changed on the last encode, for the CLI to show

    @property
    def config(self) -> dict[str, Any]:
        return {"name": self.name, "height": self.height, "width": self.width}

    @property
    def num_tokens(self) -> int:
        return self.height * self.width * len(CHANNELS)

    def token_name(self, token_id: int, position: int | None = None) -> str:
        """``VALUE(12)``, or ``R=12`` when the token's position in the sequence (content, no BOS) is given."""
        r = self.range_of(token_id)
        if r is self.value and position is not None:
            return f"{CHANNELS[position % len(CHANNELS)]}={int(token_id)}"
        return super().token_name(token_id)

    # -- encode -------------------------------------------------------------------------------------------------

    def load_rgb(self, source: ImageSource) -> np.ndarray:
        """``source`` as a (height, width, 3) uint8 array at codec size; the notice goes to ``last_notice``."""
        array, self.last_notice = prepare_image(source, self.height, self.width)
        return array

    def encode(self, source: ImageSource) -> np.ndarray:
        return self.load_rgb(source).reshape(-1).astype(np.int64)

    def prompt_tokens(
        self, source: ImageSource, keep_rows: int | None = None, keep_fraction: float | None = None
    ) -> np.ndarray:
        """Tokens of the top ``keep_rows`` rows (or ``keep_fraction`` of the height, rounded to whole rows)."""
        if (keep_rows is None) == (keep_fraction is None):
            raise CodecError("prompt_tokens: give exactly one of keep_rows and keep_fraction")
        if keep_fraction is not None:
            if not 0.0 <= keep_fraction <= 1.0:
                raise CodecError(f"prompt_tokens: keep_fraction={keep_fraction} is outside [0, 1]")
            keep_rows = int(np.floor(keep_fraction * self.height + 0.5))
        if not (isinstance(keep_rows, (int, np.integer)) and 0 <= keep_rows <= self.height):
            raise CodecError(f"prompt_tokens: keep_rows={keep_rows!r} is outside [0, {self.height}]")
        return self.encode(source)[: int(keep_rows) * self.width * len(CHANNELS)]

    # -- decode -------------------------------------------------------------------------------------------------

    def decode(self, tokens: Sequence[int] | np.ndarray) -> Image.Image:
        """An RGB image at codec size; a partial sequence leaves the pixels (or channels) it lacks grey."""
        arr = np.asarray(tokens).reshape(-1)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise CodecError(f"image tokens must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        lead = 0
        while lead < len(arr) and arr[lead] in self.special_ids:  # BOS may open the sequence
            lead += 1
        arr = arr[lead:]
        if len(arr) > self.num_tokens:
            raise CodecError(
                f"image codec: {len(arr)} content tokens exceed {self.height}x{self.width}x3 = {self.num_tokens}"
            )
        bad = (arr < self.value.first) | (arr > self.value.last)
        if bad.any():
            i = int(np.argmax(bad))
            raise CodecError(f"image codec: token {int(arr[i])} at content position {i} is not a byte value")
        flat = np.full(self.num_tokens, MISSING_GREY, dtype=np.uint8)
        flat[: len(arr)] = arr
        return Image.fromarray(flat.reshape(self.height, self.width, len(CHANNELS)), "RGB")

    # -- files --------------------------------------------------------------------------------------------------

    def save(self, obj: Image.Image | np.ndarray, path: str | os.PathLike) -> None:
        """Write a PNG atomically (PNG is lossless, so the saved pixels are the decoded tokens)."""
        img = Image.fromarray(np.asarray(obj, dtype=np.uint8)) if isinstance(obj, np.ndarray) else obj
        if not isinstance(img, Image.Image):
            raise CodecError(f"{path}: image codec saves a PIL image or uint8 array, got {type(obj).__name__}")
        atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))

    def inspect(self, path: ImageSource) -> dict[str, Any]:
        img = open_image(path) if isinstance(path, (str, os.PathLike)) else None
        tokens = self.encode(path)
        info: dict[str, Any] = {"file": str(path)} if img is not None else {}
        if img is not None:
            info.update(format=img.format, width=img.width, height=img.height, mode=img.mode)
        info.update(
            codec_size=f"{self.width}x{self.height}",
            tokens=int(len(tokens)),
            notice=self.last_notice,
            mean_rgb=[round(float(m), 1) for m in tokens.reshape(-1, 3).mean(axis=0)],
        )
        return info


# ---------------------------------------------------------------------------------------------------------------
# Loading and preparing images


def open_image(path: str | os.PathLike) -> Image.Image:
    """A fully loaded PIL image; unreadable, empty or truncated files are a CodecError naming the file."""
    path = check_file(path)
    try:
        img = Image.open(path)
        img.load()  # Image.open is lazy: truncated pixel data only fails here
    except UnidentifiedImageError:
        raise CodecError(f"{path}: not an image file (Pillow cannot identify it)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise CodecError(f"{path}: corrupt or truncated image ({e})") from None
    return img


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_bit_depth(img: Image.Image) -> Image.Image:
    """16/32-bit grey to 8 bits by keeping the high byte (Pillow's convert would clip at 255 instead)."""
    a = np.asarray(img)
    if img.mode == "F":
        a8 = np.clip(a, 0, 255).astype(np.uint8)
    elif img.mode.startswith("I;16") or a.max(initial=0) > 255:
        a8 = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    else:
        a8 = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a8, "L").convert("RGB")


_TO_RGB: dict[str, Callable[[Image.Image], Image.Image]] = {
    "RGB": lambda img: img,
    "RGBA": _composite_on_white,
    "LA": _composite_on_white,
    "PA": _composite_on_white,
    "La": _composite_on_white,
    "RGBa": _composite_on_white,
    "I": _high_bit_depth,
    "I;16": _high_bit_depth,
    "I;16B": _high_bit_depth,
    "I;16L": _high_bit_depth,
    "I;16N": _high_bit_depth,
    "F": _high_bit_depth,
}


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white; every other mode (P, L, 1, CMYK, YCbCr …) via Pillow."""
    if img.mode == "P" and "transparency" in img.info:
        return _composite_on_white(img)
    return _TO_RGB.get(img.mode, lambda im: im.convert("RGB"))(img)


def _as_pil(source: ImageSource) -> tuple[Image.Image, str]:
    if isinstance(source, Image.Image):
        return source, "image"
    if isinstance(source, (str, os.PathLike)):
        img = open_image(source)
        # phone photos store their rotation in EXIF; the model should see them upright
        return ImageOps.exif_transpose(img) or img, str(source)
    if isinstance(source, np.ndarray):
        if (
            source.dtype != np.uint8
            or source.ndim not in (2, 3)
            or (source.ndim == 3 and source.shape[2] not in (1, 3, 4))
        ):
            raise CodecError(
                f"image array must be uint8 HxW, HxWx1, HxWx3 or HxWx4, got {source.dtype} {source.shape}"
            )
        a = source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source
        return Image.fromarray(np.ascontiguousarray(a)), "array"
    raise CodecError(f"image codec cannot encode a {type(source).__name__}; give a path, PIL image or uint8 array")


def prepare_image(source: ImageSource, height: int, width: int) -> tuple[np.ndarray, str | None]:
    """(height, width, 3) uint8 RGB and a one-line notice of what was changed, or None if nothing was.

    A different size is cropped to the largest centred region with the target aspect ratio, then resized with
    Lanczos (Pillow's reducing_gap first shrinks large images by box averaging, which keeps it fast and
    alias-free).
    """
    img, label = _as_pil(source)
    changes = []
    if img.mode != "RGB":
        changes.append(f"converted {img.mode} to RGB" + (" on white" if "A" in img.mode or "a" in img.mode else ""))
        img = to_rgb(img)
    w, h = img.size
    if (w, h) != (width, height):
        crop_w, crop_h = (
            (w, round(w * height / width)) if w * height <= h * width else (round(h * width / height), h)
        )
        crop_w, crop_h = max(1, min(w, crop_w)), max(1, min(h, crop_h))
        left, top = (w - crop_w) // 2, (h - crop_h) // 2
        box = (left, top, left + crop_w, top + crop_h)
        # crop first: resize(box=...) would let the Lanczos kernel reach past the box and bleed in cropped pixels
        img = img.crop(box).resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
        crop = f"centre-cropped to {crop_w}x{crop_h}, " if (crop_w, crop_h) != (w, h) else ""
        changes.append(f"{crop}resized {w}x{h} to {width}x{height}")
    array = np.asarray(img, dtype=np.uint8)
    notice = f"{label}: " + "; ".join(changes) if changes else None
    return array, notice


def load_rgb(path: ImageSource, height: int = 32, width: int = 32) -> np.ndarray:
    """``path`` as a (height, width, 3) uint8 RGB array (see ``prepare_image``)."""
    return prepare_image(path, height, width)[0]
