"""`perceiver encode`, `decode`, `inspect` and `tokenizer train`: the codecs on their own, without a model.

Useful to see what a model will see: the token count and the first tokens by name, what a file holds (notes and
pedal events, image size and mode, bytes per token), and whether a file survives encode → decode. Token files
are .npy arrays of int64 content tokens, without BOS, exactly what ``codec.encode`` returns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

import perceiver_cli

from ..codecs import Codec, CodecError, ImageCodec, MusicCodec, TextCodec
from ..codecs.base import as_token_array, atomic_write, check_file
from ..train.prepare import EXTENSIONS  # the files `perceiver prepare` picks up, per modality
from .errors import UsageError, report_errors
from .options import Force, Json

DEFAULT_TOKENIZER = Path(perceiver_cli.__file__).resolve().parent.parent / "tokenizers" / "text-v1.model"

Modality = Annotated[str, typer.Argument(help="music | image | text")]
Tokenizer = Annotated[
    Path | None, typer.Option("--tokenizer", help=f"Text: SentencePiece model (default: {DEFAULT_TOKENIZER.name}).")
]
ImageSize = Annotated[int | None, typer.Option("--image-size", help="Image: codec resolution (square).")]


# ----------------------------------------------------------------------------------------------------------
# One row per modality: how to build its codec, how to name a token at a position, which files it reads


@dataclass(frozen=True)
class CodecOptions:
    tokenizer: Path | None = None
    image_size: int | None = None


def _text_codec(options: CodecOptions) -> Codec:
    path = options.tokenizer or DEFAULT_TOKENIZER
    if not path.exists():
        which = "--tokenizer" if options.tokenizer else "the shipped tokenizer"
        raise FileNotFoundError(
            f"{path}: no such tokenizer ({which}); pass --tokenizer PATH or train one with `perceiver tokenizer train`"
        )
    return TextCodec(path)


@dataclass(frozen=True)
class ModalitySpec:
    build: Callable[[CodecOptions], Codec]
    extensions: tuple[str, ...]
    token_name: Callable[[Codec, int, int], str] = lambda codec, token, position: codec.token_name(token)


MODALITIES: dict[str, ModalitySpec] = {
    "music": ModalitySpec(lambda o: MusicCodec(), EXTENSIONS["music"]),
    "image": ModalitySpec(
        lambda o: ImageCodec(o.image_size or 32, o.image_size or 32),
        EXTENSIONS["image"],
        lambda codec, token, position: codec.token_name(token, position=position),
    ),
    "text": ModalitySpec(_text_codec, EXTENSIONS["text"]),
}


def _spec(modality: str) -> ModalitySpec:
    if modality not in MODALITIES:
        raise UsageError(f"unknown modality {modality!r}; choose from {', '.join(MODALITIES)}")
    return MODALITIES[modality]


def guess_modality(path: Path) -> str:
    """The modality whose extensions ``path`` ends with; UsageError naming the choices otherwise."""
    name = path.name.lower()
    for modality, spec in MODALITIES.items():
        if name.endswith(spec.extensions):
            return modality
    raise UsageError(f"{path}: cannot tell the modality from the extension; pass --modality {'|'.join(MODALITIES)}")


def _check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists (use --force to overwrite)")
    if path.is_dir():
        raise CodecError(f"{path}: is a directory, cannot write a file there")


def load_tokens(path: Path) -> np.ndarray:
    """A 1-D integer .npy array; anything else is a CodecError naming the file."""
    check_file(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CodecError(
            f"{path}: not a .npy token file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if not isinstance(array, np.ndarray) or array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        shape = getattr(array, "shape", "?")
        raise CodecError(f"{path}: expected a 1-D integer token array, got {getattr(array, 'dtype', '?')} {shape}")
    return array.astype(np.int64)


def _save_tokens(tokens: np.ndarray, path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file handle, so that np.save does not append ".npy" to the temp name
            np.save(handle, tokens.astype(np.int64), allow_pickle=False)

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------
# Commands


@report_errors
def encode_command(
    modality: Modality,
    file: Annotated[Path, typer.Argument(help="MIDI file, image or UTF-8 text file.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the tokens here as int64 .npy.")] = None,
    tokenizer: Tokenizer = None,
    image_size: ImageSize = 32,
    show: Annotated[int, typer.Option("--show", help="Print the first N tokens by name (0: none).")] = 32,
    force: Force = False,
    json_output: Json = False,
) -> None:
    """Encode a file into content tokens (no BOS); print the count and the first tokens by name."""
    spec = _spec(modality)
    codec = spec.build(CodecOptions(tokenizer, image_size))
    check_file(file)
    if out is not None:
        _check_output(out, force)
    tokens = as_token_array(codec.encode(file), codec)
    if out is not None:
        _save_tokens(tokens, out)
    first = tokens[: max(0, show)].tolist()
    names = [spec.token_name(codec, t, i) for i, t in enumerate(first)]
    notice = getattr(codec, "last_notice", None)
    if json_output:
        summary = {
            "modality": modality,
            "file": str(file),
            "tokens": len(tokens),
            "first": first,
            "names": names,
            "out": str(out) if out else None,
            "notice": notice,
        }
        print(json.dumps(summary))
        return
    if notice:
        typer.echo(notice, err=True)
    print(f"{file}: {len(tokens):,} {modality} tokens (vocab {codec.vocab_size})" + (f" -> {out}" if out else ""))
    if names:
        more = f" … (+{len(tokens) - len(names):,})" if len(tokens) > len(names) else ""
        print(" ".join(names) + more)


def _infer_image_size(tokens: np.ndarray) -> int:
    """Side of the square image a full token sequence fills (32 if it is not one)."""
    content = int(np.sum(tokens != ImageCodec().bos_id))
    side = math.isqrt(content // 3)
    return side if side > 0 and 3 * side * side == content else 32


@report_errors
def decode_command(
    modality: Modality,
    tokens_file: Annotated[Path, typer.Argument(help="An int64 .npy of tokens (perceiver encode --out).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write (.mid, .png or .txt).")],
    tokenizer: Tokenizer = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Image: resolution (default: inferred from the token count).")
    ] = None,
    force: Force = False,
    json_output: Json = False,
) -> None:
    """Decode a token file back into a MIDI file, a PNG or UTF-8 text."""
    spec = _spec(modality)
    tokens = load_tokens(tokens_file)
    codec = spec.build(CodecOptions(tokenizer, image_size or _infer_image_size(tokens)))  # size: images only
    _check_output(out, force)
    tokens = as_token_array(tokens, codec)
    codec.save(codec.decode(tokens), out)
    if json_output:
        print(json.dumps({"modality": modality, "tokens": len(tokens), "out": str(out)}))
    else:
        print(f"{tokens_file}: {len(tokens):,} {modality} tokens -> {out}")


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


@report_errors
def inspect_command(
    file: Annotated[Path, typer.Argument(help="MIDI file, image or text file.")],
    modality: Annotated[
        str | None, typer.Option("--modality", "-m", help="music | image | text (default: from the extension).")
    ] = None,
    tokenizer: Tokenizer = None,
    image_size: ImageSize = 32,
    json_output: Json = False,
) -> None:
    """Show what the codec sees in a file: its contents, the token count and what was changed on the way."""
    check_file(file)
    modality = modality or guess_modality(file)
    codec = _spec(modality).build(CodecOptions(tokenizer, image_size))
    info = {"modality": modality, **codec.inspect(file)}
    if json_output:
        print(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(file), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in info.items():
        if key != "file":
            table.add_row(key.replace("_", " "), _cell(value))
    Console(highlight=False).print(table)


tokenizer_app = typer.Typer(
    name="tokenizer", help="SentencePiece tokenizers for the text codec.", no_args_is_help=True
)


@tokenizer_app.command("train")
@report_errors
def tokenizer_train_command(
    inputs: Annotated[
        list[Path], typer.Option("--input", "-i", help="UTF-8 text file(s) (.txt, .txt.xz); repeatable.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Model to write, e.g. tokenizers/NAME.model (+ NAME.vocab).")
    ],
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="Number of pieces, bytes and specials included.")
    ] = 8000,
    model_type: Annotated[str, typer.Option("--model-type", help="unigram | bpe")] = "unigram",
    strip_gutenberg: Annotated[
        bool, typer.Option("--strip-gutenberg", help="Remove Project Gutenberg headers and footers first.")
    ] = False,
    force: Force = False,
    json_output: Json = False,
) -> None:
    """Train a lossless SentencePiece tokenizer (byte fallback, no normalisation) on text files."""
    from ..codecs.text import train_tokenizer

    for path in inputs:
        check_file(path)
    model_path = out if out.suffix == ".model" else out.with_name(out.name + ".model")
    _check_output(model_path, force)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    typer.echo(f"training a {vocab_size}-piece {model_type} tokenizer on {len(inputs)} file(s) …", err=True)
    written = train_tokenizer(
        inputs, model_path, vocab_size=vocab_size, model_type=model_type, strip_headers=strip_gutenberg
    )
    codec = TextCodec(written)
    if json_output:
        print(
            json.dumps(
                {
                    "out": str(written),
                    "vocab": str(written.with_suffix(".vocab")),
                    "vocab_size": codec.vocab_size,
                    "sha256": codec.sha256,
                }
            )
        )
    else:
        print(f"{written} ({codec.vocab_size} pieces) and {written.with_suffix('.vocab')}")


def register(app: typer.Typer) -> None:
    app.command("encode")(encode_command)
    app.command("decode")(decode_command)
    app.command("inspect")(inspect_command)
    app.add_typer(tokenizer_app, name="tokenizer")
