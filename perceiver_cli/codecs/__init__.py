"""Modality codecs (music, image, text) and the registry that rebuilds one from a checkpoint's codec config.

Importing this package registers every built-in codec; see ``base`` for the protocol they follow.
"""

from perceiver_cli.codecs import image, music, text  # noqa: F401  (imported to register the codecs)
from perceiver_cli.codecs.base import (
    Codec,
    CodecError,
    TokenRange,
    available_codecs,
    build_ranges,
    codec_from_config,
    get_codec_class,
    register_codec,
)
from perceiver_cli.codecs.image import ImageCodec
from perceiver_cli.codecs.music import MusicCodec
from perceiver_cli.codecs.text import TextCodec

__all__ = [
    "Codec",
    "CodecError",
    "ImageCodec",
    "MusicCodec",
    "TextCodec",
    "TokenRange",
    "available_codecs",
    "build_ranges",
    "codec_from_config",
    "get_codec_class",
    "register_codec",
]
