"""Codec registry and the protocol every codec shares (ranges table, specials, config round trip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from perceiver_cli.codecs import (
    Codec,
    CodecError,
    ImageCodec,
    MusicCodec,
    TextCodec,
    TokenRange,
    available_codecs,
    build_ranges,
    codec_from_config,
    get_codec_class,
    register_codec,
)
from perceiver_cli.codecs.text import train_tokenizer


@pytest.fixture(scope="module")
def text_codec(tmp_path_factory) -> TextCodec:
    folder = tmp_path_factory.mktemp("tok")
    words = "the cat sat on a mat and dog by log quick brown fox jumps over lazy wizard vexing ghost".split()
    lines = [" ".join(words[(i * k) % len(words)] for k in range(1, 12)) + "." for i in range(600)]
    (folder / "c.txt").write_text("\n".join(lines), encoding="utf-8")
    return TextCodec(train_tokenizer([folder / "c.txt"], folder / "t.model", vocab_size=300))


@pytest.fixture(params=["music", "image", "text"])
def codec(request, text_codec) -> Codec:
    return {"music": MusicCodec(), "image": ImageCodec(8, 8), "text": text_codec}[request.param]


def test_available_codecs():
    assert available_codecs() == ["image", "music", "text"]
    assert get_codec_class("music") is MusicCodec


def test_unknown_codec_lists_valid_ones():
    with pytest.raises(CodecError, match="unknown codec 'audio'; available codecs: image, music, text"):
        get_codec_class("audio")
    with pytest.raises(CodecError, match="unknown codec"):
        codec_from_config({"name": "audio"})


def test_bad_configs():
    with pytest.raises(CodecError, match="'name' key"):
        codec_from_config({"height": 3})
    with pytest.raises(CodecError, match="invalid.*colour"):
        codec_from_config({"name": "image", "colour": "red"})


def test_ranges_are_contiguous_from_zero(codec):
    assert codec.ranges[0].first == 0
    for a, b in zip(codec.ranges, codec.ranges[1:], strict=False):
        assert b.first == a.last + 1
    assert codec.vocab_size == codec.ranges[-1].last + 1
    assert codec.bos_id in codec.special_ids and codec.range_of(codec.bos_id).kind == "BOS"


def test_config_is_json_and_rebuilds_identical_codec(codec, tmp_path):
    config = json.loads(json.dumps(codec.config))
    assert config["name"] == codec.name
    for name, path in codec.files().items():  # what a checkpoint does: copy aux files next to config.json
        (tmp_path / name).write_bytes(Path(path).read_bytes())
    rebuilt = codec_from_config(config, base_dir=tmp_path)
    assert type(rebuilt) is type(codec) and rebuilt.config == codec.config
    assert rebuilt.vocab_size == codec.vocab_size and rebuilt.bos_id == codec.bos_id


def test_every_token_has_a_name(codec):
    names = [codec.token_name(i) for i in range(codec.vocab_size)]
    assert all(names)
    assert codec.token_name(codec.bos_id) == "BOS"
    with pytest.raises(CodecError, match="outside"):
        codec.token_name(codec.vocab_size)


def test_range_lookup(codec):
    kind = codec.ranges[0].kind
    assert codec.range(kind) is codec.ranges[0]
    with pytest.raises(CodecError, match="no token kind 'NOPE'; kinds:"):
        codec.range("NOPE")


def test_encode_returns_1d_int64_without_bos(codec):
    source = {
        "music": Path(__file__).parent / "fixtures" / "music21_bach_bwv66.6.mid",
        "image": None,
        "text": "the cat",
    }[codec.name]
    if source is None:
        source = np.zeros((8, 8, 3), dtype=np.uint8)
    tokens = codec.encode(source)
    assert tokens.ndim == 1 and tokens.dtype == np.int64 and len(tokens) > 0
    assert codec.bos_id not in tokens.tolist()


def test_build_ranges():
    assert build_ranges([("A", 2), ("B", 1)]) == (TokenRange("A", 0, 1), TokenRange("B", 2, 2))
    assert 1 in TokenRange("A", 0, 1) and 2 not in TokenRange("A", 0, 1)
    with pytest.raises(CodecError, match="'B': count=0"):
        build_ranges([("A", 2), ("B", 0)])
    with pytest.raises(CodecError, match="repeat"):
        build_ranges([("A", 2), ("A", 1)])


def test_register_rejects_duplicate_names_and_nameless_classes():
    class Other(MusicCodec):
        name = "music"

    with pytest.raises(CodecError, match="already registered by MusicCodec"):
        register_codec(Other)

    class Nameless(Codec):  # abstract methods never called: registration is checked first
        pass

    with pytest.raises(CodecError, match="Nameless: .*`name`"):
        register_codec(Nameless)


def test_codecs_compare_by_config():
    assert MusicCodec() == MusicCodec() and MusicCodec() != MusicCodec(num_velocity_bins=16)
    assert ImageCodec(32, 32) == codec_from_config({"name": "image", "height": 32, "width": 32})
    assert len({MusicCodec(), MusicCodec()}) == 1
