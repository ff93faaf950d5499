"""Text codec: lossless round trip for every string, tokenizer training, config/sha256, Gutenberg stripping."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perceiver_cli.codecs import CodecError, TextCodec, codec_from_config
from perceiver_cli.codecs.text import (
    ESC,
    META,
    escape,
    normalise_newlines,
    read_text,
    strip_gutenberg,
    train_tokenizer,
    unescape,
)

WORDS = "the of and a to in was he it that his she with had for you not be on at as by but my this".split()
WORDS += "morning evening garden window letter river little house father mother 1848 2024 said --".split()


def corpus_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ";"]))
    return lines


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Path:
    """A ~320-piece model trained on text written here (never on shared data), in well under a second."""
    folder = tmp_path_factory.mktemp("tok")
    src = folder / "corpus.txt"
    src.write_text("\n".join(corpus_lines(3000)), encoding="utf-8")
    return train_tokenizer([src], folder / "tiny", vocab_size=320)


@pytest.fixture(scope="session")
def codec(tokenizer) -> TextCodec:
    return TextCodec(tokenizer)


# -- golden table -------------------------------------------------------------------------------------------------


def test_vocabulary_table_read_off_the_model(codec):
    n = codec.sp.get_piece_size()
    assert n == 320 == codec.vocab_size
    assert [(r.kind, r.first, r.last) for r in codec.ranges] == [
        ("UNK", 0, 0),
        ("BOS", 1, 1),
        ("EOS", 2, 2),
        ("BYTE", 3, 258),
        ("PIECE", 259, n - 1),
    ]
    assert (codec.bos_id, codec.eos_id) == (1, 2) and codec.special_ids == {1, 2}


def test_token_names_at_range_edges(codec):
    assert [codec.token_name(i) for i in (0, 1, 2, 3, 258)] == ["UNK", "BOS", "EOS", "BYTE(<0x00>)", "BYTE(<0xFF>)"]
    assert codec.token_name(259) == f"PIECE({codec.sp.id_to_piece(259)})"
    assert codec.token_name(codec.vocab_size - 1).startswith("PIECE(")
    with pytest.raises(CodecError, match="320"):
        codec.token_name(320)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("\x00", [3]),  # first byte piece
        ("\u00ff", [3 + 0xC3, 3 + 0xBF]),  # ÿ = UTF-8 C3 BF, both byte pieces; 0xFF itself is never valid UTF-8
        ("", []),
    ],
)
def test_byte_pieces_golden(codec, text, tokens):
    assert codec.encode(text).tolist() == tokens
    assert codec.decode(tokens) == text


def test_last_piece_decodes_to_its_surface(codec):
    last = codec.vocab_size - 1
    assert codec.decode([last]) == unescape(codec.sp.id_to_piece(last).replace(META, " "))
    assert codec.encode(codec.decode([last])).tolist() == [last]


# -- lossless round trip ------------------------------------------------------------------------------------------

AWKWARD = [
    "",
    " ",
    "   leading, trailing and  multiple   spaces   ",
    "\t\ttabs\tand\r\nCRLF\r\nand lone\rCR\n",
    "\x00\x01\x1f\x7f controls \x00",
    "emoji 😀👍🏽 and 👨‍👩‍👧 and CJK 日本語のテキスト 中文",
    "▁ the SentencePiece meta symbol ▁▁ and ▁x",
    f"the escape char {ESC} alone, {ESC}{ESC}, {ESC}\ue001 and {ESC}▁ and trailing {ESC}",
    "<unk> <s> </s> <0x41> look like special pieces",
    "\ufeffa leading BOM",
    "combining e\u0301 vs é, ligature ﬁ, full-width Ａ, NBSP\u00a0, ideographic\u3000space",
    "zero\u200bwidth and RTL \u202eabc\u202c",
    "\n\n\n",
]


@pytest.mark.parametrize("text", AWKWARD)
def test_awkward_strings_round_trip(codec, text):
    assert codec.decode(codec.encode(text)) == text


def test_very_long_string_round_trips(codec):
    text = "\n".join(corpus_lines(2000, seed=1)) + " ▁ 😀" * 500 + "x" * 50_000
    assert codec.decode(codec.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_text(codec, text):
    tokens = codec.encode(text)
    assert tokens.dtype == np.int64
    assert codec.decode(tokens) == text
    assert not set(tokens.tolist()) & codec.special_ids  # encode never adds BOS/EOS


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from([ESC, META, "\ue001", "a", " ", "\n"])))
def test_escape_is_reversible(text):
    assert unescape(escape(text)) == text
    assert META not in escape(text)


def test_without_escape_sentencepiece_loses_the_meta_symbol(codec):
    # why the codec escapes: SentencePiece alone decodes a literal ▁ as a space
    assert codec.sp.decode(codec.sp.encode("a▁b")) == "a b"
    assert codec.decode(codec.encode("a▁b")) == "a▁b"


def test_lone_surrogate_rejected(codec):
    with pytest.raises(CodecError, match="surrogate U\\+D800 at index 1"):
        codec.encode("a\ud800b")


def test_decode_skips_bos_eos_and_checks_range(codec):
    tokens = codec.encode("hello there").tolist()
    assert codec.decode([1, *tokens, 2]) == "hello there"
    with pytest.raises(CodecError, match="9999 at position 0"):
        codec.decode([9999])


def test_one_megabyte_round_trips(codec):
    # its encode time is measured by `perceiver bench --codecs`, not here (timed tests flake on busy machines)
    text = "\n".join(corpus_lines(20_000, seed=2))
    text = (text * (1_000_000 // len(text) + 1))[:1_000_000]
    assert codec.decode(codec.encode(text)) == text


# -- files and config ---------------------------------------------------------------------------------------------


def test_encode_path_reads_utf8_exactly(codec, tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("crlf\r\nkept ▁ 😀\n".encode())
    assert codec.decode(codec.encode(path)) == "crlf\r\nkept ▁ 😀\n"
    (tmp_path / "empty.txt").write_bytes(b"")
    assert codec.encode(tmp_path / "empty.txt").tolist() == []


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("latin1.txt", b"caf\xe9\n", "not valid UTF-8 \\(byte 0xe9 at offset 3\\)"),
        ("missing.txt", None, "no such file"),
        ("folder.txt", "dir", "directory"),
    ],
)
def test_bad_text_files_name_the_file(codec, tmp_path, name, content, problem):
    if content == "dir":
        (tmp_path / name).mkdir()
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(CodecError, match=f"{name}.*{problem}"):
        codec.encode(tmp_path / name)


def test_save_is_atomic_utf8(codec, tmp_path):
    codec.save("line\r\nnext ▁\n", tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_bytes() == "line\r\nnext ▁\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with pytest.raises(CodecError, match="str"):
        codec.save(b"bytes", tmp_path / "x.txt")


def test_config_files_and_rebuild(codec, tokenizer, tmp_path):
    sha = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    assert codec.config == {"name": "text", "tokenizer": "tokenizer.model", "sha256": sha}
    assert codec.files() == {"tokenizer.model": tokenizer}
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.read_bytes())  # as a checkpoint stores it
    rebuilt = codec_from_config(codec.config, base_dir=tmp_path)
    assert rebuilt == codec and rebuilt.encode("the garden").tolist() == codec.encode("the garden").tolist()


def test_sha256_mismatch_rejected(codec, tokenizer, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    with pytest.raises(CodecError, match="tokenizer.model: sha256 .* does not match"):
        codec_from_config({**codec.config, "sha256": "0" * 64}, base_dir=tmp_path)
    with pytest.raises(CodecError, match="no such file"):
        codec_from_config(codec.config, base_dir=tmp_path / "elsewhere")


def test_not_a_sentencepiece_model(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(CodecError, match="bad.model: not a SentencePiece model"):
        TextCodec(tmp_path / "bad.model")


def test_train_bpe_also_lossless(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(corpus_lines(1500, seed=3)), encoding="utf-8")
    model = train_tokenizer([src], tmp_path / "bpe.model", vocab_size=320, model_type="bpe")
    assert model == tmp_path / "bpe.model" and (tmp_path / "bpe.vocab").exists()
    codec = TextCodec(model)
    for text in AWKWARD:
        assert codec.decode(codec.encode(text)) == text
    with pytest.raises(CodecError, match="model_type='wordpiece'"):
        train_tokenizer([src], tmp_path / "x", model_type="wordpiece")


def test_inspect(codec, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo wörld\n", encoding="utf-8")
    info = codec.inspect(path)
    assert (info["chars"], info["bytes"]) == (12, 14)
    assert info["tokens"] == len(codec.encode(path))


# -- cleaning -----------------------------------------------------------------------------------------------------

BODY = "CHAPTER I\n\nIt was a dark and stormy night.\n"


@pytest.mark.parametrize(
    ("header", "footer"),
    [
        (
            "The Project Gutenberg EBook of X\n\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\n\n",
            "\n\nEnd of the Project Gutenberg EBook of X, by Y\n\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence",
        ),
        (
            "Title: X\n\n***START OF THE PROJECT GUTENBERG EBOOK X***\n",
            "\n***END OF THE PROJECT GUTENBERG EBOOK X***\n\nlicence text",
        ),
        (
            "*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n",
            "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\n",
        ),
        (
            "small print...\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n",
            "\nEnd of Project Gutenberg's X, by Y\n",
        ),
        (
            "*Project Gutenberg Etext of X*\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n",
            "\n*Project Gutenberg Etext of X*\n",
        ),
    ],
    ids=["this-ebook", "no-space", "crlf", "small-print", "etext"],
)
def test_strip_gutenberg(header, footer):
    assert strip_gutenberg(header + BODY + footer) == BODY


def test_strip_gutenberg_leaves_unmarked_text_alone():
    text = "  A novel with no boilerplate.\n\nIt mentions the Project Gutenberg in passing.  \n"
    assert strip_gutenberg(text) == text


def test_strip_gutenberg_footer_only():
    assert strip_gutenberg(BODY + "\nEnd of the Project Gutenberg EBook of X\n") == BODY


def test_normalise_newlines():
    assert normalise_newlines("\ufeffa\r\nb\rc\nd\r\n\r") == "a\nb\nc\nd\n\n"
    assert normalise_newlines("no\ufeffchange") == "no\ufeffchange"


def test_read_text_xz(tmp_path):
    import lzma

    (tmp_path / "a.txt.xz").write_bytes(lzma.compress("xz ▁ text\r\n".encode()))
    assert read_text(tmp_path / "a.txt.xz") == "xz ▁ text\r\n"
