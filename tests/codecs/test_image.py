"""Image codec: golden token layout, mode conversion, crop/resize, partial decode, a real photo, bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from perceiver_cli.codecs import CodecError, ImageCodec
from perceiver_cli.codecs.image import load_rgb, prepare_image


def sample_photo() -> Path | None:
    """Grace Hopper's portrait from matplotlib's bundled sample data (a real photo nobody here took)."""
    try:
        from matplotlib import cbook

        path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    except Exception:
        return None
    return path if path.exists() else None


PHOTO = sample_photo()
needs_photo = pytest.mark.skipif(PHOTO is None, reason="matplotlib sample photo not installed")


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- golden table -------------------------------------------------------------------------------------------------


def test_vocabulary_table():
    codec = ImageCodec()
    assert [(r.kind, r.first, r.last) for r in codec.ranges] == [("VALUE", 0, 255), ("BOS", 256, 256)]
    assert codec.vocab_size == 257 and codec.bos_id == 256 and codec.eos_id is None
    assert codec.special_ids == {256}
    assert codec.config == {"name": "image", "height": 32, "width": 32}


@pytest.mark.parametrize(
    ("token_id", "position", "name"),
    [
        (0, None, "VALUE(0)"),
        (255, None, "VALUE(255)"),
        (256, None, "BOS"),
        (12, 0, "R=12"),
        (0, 4, "G=0"),
        (255, 5, "B=255"),
    ],
)
def test_token_names(token_id, position, name):
    assert ImageCodec().token_name(token_id, position) == name


def test_raster_order_rgb_per_pixel():
    a = np.array([[[0, 1, 2], [3, 4, 5]], [[250, 251, 252], [253, 254, 255]]], dtype=np.uint8)
    codec = ImageCodec(2, 2)
    assert codec.encode(a).tolist() == [0, 1, 2, 3, 4, 5, 250, 251, 252, 253, 254, 255]
    assert np.asarray(codec.decode(list(range(6)) + [250, 251, 252, 253, 254, 255])).tolist() == a.tolist()
    assert codec.encode(a).dtype == np.int64
    assert codec.last_notice is None


# -- round trips --------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12).flatmap(lambda h: st.integers(1, 12).flatmap(lambda w: arrays(np.uint8, (h, w, 3)))))
def test_round_trip_exact_at_codec_resolution(a):
    codec = ImageCodec(a.shape[0], a.shape[1])
    tokens = codec.encode(a)
    img = codec.decode(tokens)
    assert img.mode == "RGB" and img.size == (a.shape[1], a.shape[0])
    assert np.array_equal(np.asarray(img), a)
    assert codec.encode(img).tolist() == tokens.tolist()


def test_round_trip_through_saved_png(tmp_path):
    codec = ImageCodec(16, 24)
    a = rgb(16, 24)
    codec.save(codec.decode(codec.encode(a)), tmp_path / "x.png")
    assert np.array_equal(load_rgb(tmp_path / "x.png", 16, 24), a)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


@needs_photo
def test_real_photo_round_trip_exact():
    codec = ImageCodec(64, 64)
    tokens = codec.encode(PHOTO)
    assert len(tokens) == 64 * 64 * 3
    assert "grace_hopper.jpg" in codec.last_notice and "512x600" in codec.last_notice
    assert codec.encode(codec.decode(tokens)).tolist() == tokens.tolist()
    info = codec.inspect(PHOTO)
    assert (info["width"], info["height"], info["mode"], info["format"]) == (512, 600, "RGB", "JPEG")


# -- partial and over-long sequences ------------------------------------------------------------------------------


def test_partial_sequence_leaves_missing_pixels_grey():
    codec = ImageCodec(2, 2)
    img = np.asarray(codec.decode([10, 20, 30, 40, 50]))  # one pixel and two channels of the next
    assert img[0, 0].tolist() == [10, 20, 30]
    assert img[0, 1].tolist() == [40, 50, 128]
    assert img[1].tolist() == [[128, 128, 128]] * 2
    assert np.asarray(codec.decode([])).tolist() == [[[128] * 3] * 2] * 2


def test_leading_bos_skipped_elsewhere_rejected():
    codec = ImageCodec(1, 1)
    assert np.asarray(codec.decode([256, 1, 2, 3])).tolist() == [[[1, 2, 3]]]
    with pytest.raises(CodecError, match="256 at content position 1"):
        codec.decode([1, 256, 3])


def test_too_many_tokens_rejected():
    with pytest.raises(CodecError, match="13 content tokens exceed 2x2x3 = 12"):
        ImageCodec(2, 2).decode([0] * 13)


def test_prompt_tokens_rows_and_fraction():
    codec = ImageCodec(4, 3)
    a = rgb(4, 3)
    assert codec.prompt_tokens(a, keep_rows=1).tolist() == a[:1].reshape(-1).tolist()
    assert len(codec.prompt_tokens(a, keep_fraction=0.5)) == 2 * 3 * 3
    assert len(codec.prompt_tokens(a, keep_fraction=0.4)) == 2 * 3 * 3  # 1.6 rows rounds to 2
    assert len(codec.prompt_tokens(a, keep_rows=0)) == 0
    for kwargs in ({}, {"keep_rows": 1, "keep_fraction": 0.5}, {"keep_rows": 5}, {"keep_fraction": 1.5}):
        with pytest.raises(CodecError, match="prompt_tokens"):
            codec.prompt_tokens(a, **kwargs)


# -- conversion and resizing --------------------------------------------------------------------------------------


def test_rgba_composited_on_white():
    a = np.zeros((1, 2, 4), dtype=np.uint8)
    a[0, 0] = [255, 0, 0, 0]  # fully transparent red → white
    a[0, 1] = [255, 0, 0, 255]  # opaque red
    out, notice = prepare_image(Image.fromarray(a, "RGBA"), 1, 2)
    assert out.tolist() == [[[255, 255, 255], [255, 0, 0]]]
    assert "RGBA" in notice and "white" in notice


@pytest.mark.parametrize(
    ("mode", "make", "expected"),
    [
        ("L", lambda: Image.new("L", (1, 1), 77), [77, 77, 77]),
        ("LA", lambda: Image.new("LA", (1, 1), (0, 0)), [255, 255, 255]),
        ("1", lambda: Image.new("1", (1, 1), 1), [255, 255, 255]),
        ("CMYK", lambda: Image.new("CMYK", (1, 1), (0, 255, 255, 0)), [255, 0, 0]),
        ("I;16", lambda: Image.fromarray(np.array([[65535]], dtype=np.uint16)), [255, 255, 255]),
        ("I;16", lambda: Image.fromarray(np.array([[512]], dtype=np.uint16)), [2, 2, 2]),
    ],
)
def test_modes_converted_to_rgb(mode, make, expected):
    img = make()
    assert img.mode == mode
    out, notice = prepare_image(img, 1, 1)
    assert out[0, 0].tolist() == expected
    assert mode in notice


def test_palette_with_transparency():
    img = Image.new("P", (1, 2))
    img.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 1), 1)
    img.info["transparency"] = 0  # palette entry 0 (blue) is transparent
    assert prepare_image(img, 2, 1)[0].reshape(-1, 3).tolist() == [[255, 255, 255], [255, 0, 0]]


def test_wide_image_centre_cropped():
    a = np.zeros((32, 96, 3), dtype=np.uint8)
    a[:, :32] = [0, 0, 255]
    a[:, 32:64] = [0, 255, 0]
    a[:, 64:] = [255, 0, 0]
    out, notice = prepare_image(a, 16, 16)
    assert (np.abs(out.astype(int) - [0, 255, 0]) <= 1).all()  # only the green middle survives
    assert notice == "array: centre-cropped to 32x32, resized 96x32 to 16x16"


def test_non_square_target_keeps_aspect():
    a = np.zeros((64, 64, 3), dtype=np.uint8)
    a[:16] = 255  # white top quarter is cropped away for a 2:1 target
    out, notice = prepare_image(a, 8, 16)
    assert out.shape == (8, 16, 3) and out.max() <= 1
    assert "centre-cropped to 64x32" in notice


def test_same_aspect_resize_has_no_crop():
    out, notice = prepare_image(rgb(64, 64), 32, 32)
    assert out.shape == (32, 32, 3) and notice == "array: resized 64x64 to 32x32"


def test_bad_arrays_rejected():
    with pytest.raises(CodecError, match="uint8"):
        ImageCodec(2, 2).encode(np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(CodecError, match="uint8"):
        ImageCodec(2, 2).encode(np.zeros((2, 2, 5), dtype=np.uint8))


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.fixture()
def bad_files(tmp_path):
    good = io.BytesIO()
    Image.fromarray(rgb(64, 64)).save(good, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("truncated.jpg", "truncated"),
        ("text.png", "not an image file"),
        ("empty.png", "empty"),
        ("folder.png", "directory"),
        ("missing.png", "no such file"),
    ],
)
def test_bad_image_names_the_file(bad_files, name, problem):
    with pytest.raises(CodecError, match=f"{name}.*{problem}"):
        ImageCodec().encode(bad_files / name)


def test_bad_config():
    with pytest.raises(CodecError, match="height=0"):
        ImageCodec(0, 32)
