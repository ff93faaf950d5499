"""Text codec: SentencePiece subwords with byte fallback, lossless for every Unicode string.

Based on the Perceiver AR book experiments (Hawthorne et al. 2022, section 5.2, PG-19), which use a SentencePiece
vocabulary (Kudo & Richardson 2018). Normalisation is switched off and unknown characters fall back to UTF-8 byte
pieces, so decode(encode(s)) == s. SentencePiece still writes spaces as U+2581 "▁" and so turns a literal "▁"
into a space; this codec escapes that character (and its escape character) before SentencePiece sees the text.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from perceiver_cli.codecs.base import Codec, CodecError, atomic_write, build_ranges, read_bytes, register_codec

# -- reversible pre-escape -----------------------------------------------------------------------------------------
# SentencePiece's whitespace meta-symbol ▁ (U+2581) decodes as a space, so a literal ▁ must not reach it. Both ▁
# and the escape character (a private-use code point that real text almost never holds) become two-character
# sequences; anything else passes untouched.
META = "\u2581"
ESC = "\ue000"
_ESCAPES = {ESC: ESC + ESC, META: ESC + "\ue001"}
_UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}
_ESCAPE_RE = re.compile(f"[{ESC}{META}]")
_UNESCAPE_RE = re.compile(f"{ESC}(.)", re.DOTALL)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def escape(text: str) -> str:
    """The text SentencePiece sees; ``unescape`` inverts it exactly."""
    if ESC not in text and META not in text:
        return text
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], text)


def unescape(text: str) -> str:
    """Inverse of ``escape``; an escape character the model emitted without a valid partner is kept as is."""
    if ESC not in text:
        return text
    return _UNESCAPE_RE.sub(lambda m: _UNESCAPES.get(m.group(1), m.group(0)), text)


def _check_unicode(text: str, where: str) -> None:
    m = _SURROGATE_RE.search(text)
    if m:
        raise CodecError(
            f"{where}: lone surrogate U+{ord(m.group(0)):04X} at index {m.start()} is not valid Unicode text"
        )


# -- reading and cleaning text ------------------------------------------------------------------------------------


def read_text(path: str | os.PathLike) -> str:
    """UTF-8 text of a file exactly as stored (no newline translation); ``.xz`` files are decompressed."""
    path = Path(path)
    data = read_bytes(path, allow_empty=True)  # an empty text file is an empty text, not an error
    if path.suffix == ".xz":
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as e:
            raise CodecError(f"{path}: corrupt xz data ({e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CodecError(f"{path}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def normalise_newlines(text: str) -> str:
    """CRLF and lone CR to LF, and drop a leading byte-order mark."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


# Project Gutenberg boilerplate markers, matched at the start of a line. The header ends at the first start
# marker; the footer begins at the first end marker after it.
_GUTENBERG_START = re.compile(
    r"^[ \t]*(?:"
    r"\*{3}[ \t]*START OF (?:THIS|THE) PROJECT GUTENBERG"  # *** START OF THIS PROJECT GUTENBERG EBOOK X ***
    r"|\*END\*[ \t]*THE SMALL PRINT!"  # *END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*
    r")[^\r\n]*(?:\r\n|\r|\n|$)",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*(?:"
    r"\*{3}[ \t]*END OF (?:THIS|THE) PROJECT GUTENBERG"  # *** END OF THIS PROJECT GUTENBERG EBOOK X ***
    r"|End of (?:the )?Project Gutenberg"  # End of the Project Gutenberg EBook of X / End of Project Gutenberg's X
    r"|\*Project Gutenberg Etext of"  # 1990s files close with the title line they open with
    r")",
    re.IGNORECASE | re.MULTILINE,
)
_BLANK_LINES = re.compile(r"\A(?:[ \t]*(?:\r\n|\r|\n))+")


def strip_gutenberg(text: str) -> str:
    """The book without its Project Gutenberg header and footer; text without the markers comes back unchanged."""
    start = _GUTENBERG_START.search(text)
    body_start = start.end() if start else 0
    end = _GUTENBERG_END.search(text, body_start)
    if start is None and end is None:
        return text
    body = text[body_start : end.start() if end else len(text)]
    body = _BLANK_LINES.sub("", body).rstrip()
    return body + "\n" if body else ""


# -- training -------------------------------------------------------------------------------------------------------


def _lines(inputs: Sequence[str | os.PathLike], strip_headers: bool) -> Iterator[str]:
    for path in inputs:
        text = normalise_newlines(read_text(path))
        if strip_headers:
            text = strip_gutenberg(text)
        for line in text.split("\n"):
            if line:
                yield escape(line)


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    max_sentence_length: int = 16384,
    input_sentence_size: int = 2_000_000,
    strip_headers: bool = False,
    split_digits: bool = True,
    seed: int = 0,
) -> Path:
    """Train a lossless SentencePiece model on UTF-8 files (one training sentence per line); returns the .model.

    ``out_path`` gets a ``.model`` suffix if it has none; a ``.vocab`` listing (piece, score) is written next to
    it. ``strip_headers`` removes Project Gutenberg boilerplate first. Both files are written atomically.
    """
    if model_type not in ("unigram", "bpe"):
        raise CodecError(f"train_tokenizer: model_type={model_type!r} is not one of ['bpe', 'unigram']")
    if not inputs:
        raise CodecError("train_tokenizer: no input files")
    out_path = Path(out_path)
    model_path = out_path if out_path.suffix == ".model" else out_path.with_name(out_path.name + ".model")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # sentence sampling and shuffling are random; make a retrain reproducible
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(inputs, strip_headers),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=0.9995,
            # lossless: no NFKC, no dummy prefix, no whitespace folding
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=split_digits,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise CodecError(f"{model_path}: SentencePiece training failed: {e}") from None
    data = model.getvalue()
    atomic_write(model_path, lambda tmp: tmp.write_bytes(data))
    sp = spm.SentencePieceProcessor(model_proto=data)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    atomic_write(model_path.with_suffix(".vocab"), lambda tmp: tmp.write_text(vocab, encoding="utf-8"))
    return model_path


# -- the codec ------------------------------------------------------------------------------------------------------

TOKENIZER_FILE = "tokenizer.model"  # the name a checkpoint stores the model under


def _piece_kind(sp: spm.SentencePieceProcessor, i: int) -> str:
    if sp.is_unknown(i):
        return "UNK"
    if i == sp.bos_id():
        return "BOS"
    if i == sp.eos_id():
        return "EOS"
    if i == sp.pad_id():
        return "PAD"
    if sp.is_control(i):
        return "CONTROL"
    if sp.is_byte(i):
        return "BYTE"
    return "PIECE"


def _ranges_from_model(sp: spm.SentencePieceProcessor) -> tuple:
    """Runs of consecutive ids of one piece type, read off the model (a repeated kind gets a numeric suffix)."""
    runs: list[list] = []
    for i in range(sp.get_piece_size()):
        kind = _piece_kind(sp, i)
        if runs and runs[-1][0] == kind and kind not in ("BOS", "EOS", "UNK", "PAD"):
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    seen: dict[str, int] = {}
    spec = []
    for kind, count in runs:
        seen[kind] = seen.get(kind, 0) + 1
        spec.append((kind if seen[kind] == 1 else f"{kind}_{seen[kind]}", count))
    return build_ranges(spec)


@register_codec
class TextCodec(Codec):
    """UTF-8 text through a SentencePiece model (see ``train_tokenizer``)."""

    name = "text"

    def __init__(self, tokenizer: str | os.PathLike, sha256: str | None = None):
        self.tokenizer_path = Path(tokenizer)
        data = read_bytes(self.tokenizer_path)
        self.sha256 = hashlib.sha256(data).hexdigest()
        if sha256 is not None and sha256 != self.sha256:
            raise CodecError(
                f"{self.tokenizer_path}: sha256 {self.sha256[:12]}… does not match the config's {sha256[:12]}… "
                "(the tokenizer is not the one this checkpoint was trained with)"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:
            raise CodecError(f"{self.tokenizer_path}: not a SentencePiece model ({e})") from None
        if self.sp.bos_id() < 0:
            raise CodecError(f"{self.tokenizer_path}: SentencePiece model has no BOS piece (train with bos_id>=0)")
        self.ranges = _ranges_from_model(self.sp)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self._skip = np.array(sorted(self.special_ids), dtype=np.int64)

    @classmethod
    def from_config(cls, settings: dict[str, Any], base_dir: Path | None) -> TextCodec:
        unknown = set(settings) - {"tokenizer", "sha256"}
        if unknown or "tokenizer" not in settings:
            raise CodecError(f"text codec config needs 'tokenizer' (and 'sha256'), got keys {sorted(settings)}")
        path = Path(settings["tokenizer"])
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return cls(path, settings.get("sha256"))

    @property
    def config(self) -> dict[str, Any]:
        return {"name": self.name, "tokenizer": TOKENIZER_FILE, "sha256": self.sha256}

    def files(self) -> dict[str, Path]:
        return {TOKENIZER_FILE: self.tokenizer_path}

    def token_name(self, token_id: int) -> str:
        r = self.range_of(token_id)
        return r.kind if r.size == 1 else f"{r.kind}({self.sp.id_to_piece(int(token_id))})"

    def encode(self, source: str | os.PathLike) -> np.ndarray:
        """Tokens of a string, or of a file's UTF-8 text when ``source`` is a Path (a str is always the text)."""
        if isinstance(source, str):
            text, where = source, "text"
        elif isinstance(source, os.PathLike):
            text, where = read_text(source), str(source)
        else:
            raise CodecError(f"text codec cannot encode a {type(source).__name__}; give a str or a Path")
        _check_unicode(text, where)
        return np.asarray(self.sp.encode(escape(text)), dtype=np.int64)

    def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
        """The text of a token sequence; BOS/EOS are skipped, invalid UTF-8 from byte pieces becomes U+FFFD."""
        arr = np.asarray(tokens).reshape(-1)
        if arr.size == 0:
            return ""
        if not np.issubdtype(arr.dtype, np.integer):
            raise CodecError(f"text tokens must be integers, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise CodecError(
                f"text token {int(arr[i])} at position {i} is outside the vocabulary [0, {self.vocab_size})"
            )
        arr = arr[~np.isin(arr, self._skip)]
        return unescape(self.sp.decode(arr.tolist()))

    def save(self, obj: str, path: str | os.PathLike) -> None:
        if not isinstance(obj, str):
            raise CodecError(f"{path}: text codec saves a str, got {type(obj).__name__}")
        _check_unicode(obj, str(path))
        data = obj.encode("utf-8")
        atomic_write(path, lambda tmp: tmp.write_bytes(data))

    def inspect(self, path: str | os.PathLike) -> dict[str, Any]:
        text = read_text(path)
        tokens = self.encode(Path(path))
        stripped = strip_gutenberg(normalise_newlines(text))
        return {
            "file": str(path),
            "chars": len(text),
            "bytes": len(text.encode("utf-8")),
            "lines": text.count("\n") + (1 if text and not text.endswith("\n") else 0),
            "tokens": int(len(tokens)),
            "bytes_per_token": round(len(text.encode("utf-8")) / max(1, len(tokens)), 3),
            "byte_fallback_tokens": int(sum(1 for t in tokens.tolist() if self.sp.is_byte(t))),
            "gutenberg_boilerplate_chars": len(normalise_newlines(text)) - len(stripped),
        }
