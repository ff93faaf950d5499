"""The codec protocol: how a modality (music, image, text) becomes a 1-D sequence of token ids and back.

Each codec's vocabulary is one table of contiguous token ranges, in the manner of magenta/note-seq's
``_event_ranges``: vocab_size, encode, decode and token names are all derived from that table. The registry that
maps codec names to classes lives here too, so that codec modules can register themselves without importing the
package ``__init__``.
"""

from __future__ import annotations

import bisect
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np


class CodecError(Exception):
    """A source could not be encoded or a config/token sequence is invalid; the message names what and where."""


@dataclass(frozen=True)
class TokenRange:
    """One contiguous block of token ids of one kind; ``first`` and ``last`` are inclusive."""

    kind: str
    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, token_id: object) -> bool:
        return isinstance(token_id, (int, np.integer)) and self.first <= token_id <= self.last


def build_ranges(spec: Iterable[tuple[str, int]], start: int = 0) -> tuple[TokenRange, ...]:
    """Lay out ``[(kind, count), ...]`` as back-to-back ranges starting at ``start``."""
    ranges = []
    first = start
    for kind, count in spec:
        if count < 1:
            raise CodecError(f"token range {kind!r}: count={count} must be >= 1")
        ranges.append(TokenRange(kind, first, first + count - 1))
        first += count
    kinds = [r.kind for r in ranges]
    if len(set(kinds)) != len(kinds):
        raise CodecError(f"token ranges repeat a kind: {kinds}")
    return tuple(ranges)


class Codec(ABC):
    """Turns one modality into content tokens (no BOS) and back; see the module docstring."""

    name: ClassVar[str]
    ranges: tuple[TokenRange, ...]
    bos_id: int
    eos_id: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.ranges[-1].last + 1

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.bos_id, self.eos_id) if i is not None)

    def range(self, kind: str) -> TokenRange:
        """The range called ``kind``; an unknown kind fails with the list of valid ones."""
        for r in self.ranges:
            if r.kind == kind:
                return r
        raise CodecError(f"{self.name} codec has no token kind {kind!r}; kinds: {[r.kind for r in self.ranges]}")

    def range_of(self, token_id: int) -> TokenRange:
        """The range holding ``token_id`` (binary search over the table)."""
        token_id = int(token_id)
        i = bisect.bisect_right([r.first for r in self.ranges], token_id) - 1
        if i < 0 or token_id > self.ranges[i].last:
            raise CodecError(f"token id {token_id} is outside the {self.name} vocabulary [0, {self.vocab_size})")
        return self.ranges[i]

    def token_name(self, token_id: int) -> str:
        """Readable name; single-id ranges are named by kind alone (``BOS``), others ``KIND(offset)``."""
        r = self.range_of(token_id)
        return r.kind if r.size == 1 else f"{r.kind}({int(token_id) - r.first})"

    def files(self) -> dict[str, Path]:
        """Auxiliary files a checkpoint must store next to the config (name in checkpoint → current path)."""
        return {}

    @property
    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able settings including ``name``; ``codec_from_config`` rebuilds an identical codec from it."""

    @abstractmethod
    def encode(self, source: Any) -> np.ndarray:
        """1-D int64 content tokens, without BOS (the data pipeline and runner prepend it)."""

    @abstractmethod
    def decode(self, tokens: Sequence[int] | np.ndarray) -> Any:
        """The modality object for a token sequence (special tokens are skipped)."""

    @abstractmethod
    def save(self, obj: Any, path: str | os.PathLike) -> None:
        """Write ``obj`` (what decode returns) to ``path`` atomically."""

    @abstractmethod
    def inspect(self, path: str | os.PathLike) -> dict[str, Any]:
        """A JSON-able summary of what the codec sees in a file."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config == self.config

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(sorted(self.config.items()))))


# ---------------------------------------------------------------------------------------------------------------
# Registry: codecs register by name; an unknown name fails with the valid ones.

_REGISTRY: dict[str, type[Codec]] = {}
C = TypeVar("C", bound=type[Codec])


def register_codec(cls: C) -> C:
    """Class decorator: make ``cls`` constructible by its ``name`` through ``codec_from_config``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise CodecError(f"{cls.__name__}: a registered codec needs a class attribute `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise CodecError(f"codec name {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def available_codecs() -> list[str]:
    return sorted(_REGISTRY)


def get_codec_class(name: str) -> type[Codec]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; available codecs: {', '.join(available_codecs())}") from None


def codec_from_config(config: dict[str, Any], base_dir: str | os.PathLike | None = None) -> Codec:
    """Rebuild a codec from its ``config``; ``base_dir`` resolves relative auxiliary file names."""
    if not isinstance(config, dict) or "name" not in config:
        raise CodecError(f"codec config must be a dict with a 'name' key, got {config!r}")
    cls = get_codec_class(config["name"])
    from_config = getattr(cls, "from_config", None)
    settings = {k: v for k, v in config.items() if k != "name"}
    if from_config is not None:
        return from_config(settings, None if base_dir is None else Path(base_dir))
    try:
        return cls(**settings)
    except TypeError as e:
        raise CodecError(f"codec config for {config['name']!r} is invalid: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by the codecs.


def check_file(path: str | os.PathLike, allow_empty: bool = False) -> Path:
    """``path`` as a Path if it is an existing regular file (non-empty unless allowed); else CodecError naming it."""
    path = Path(path)
    if not path.exists():
        raise CodecError(f"{path}: no such file")
    if path.is_dir():
        raise CodecError(f"{path}: is a directory, expected a file")
    if not allow_empty and path.stat().st_size == 0:
        raise CodecError(f"{path}: file is empty")
    return path


def read_bytes(path: str | os.PathLike, allow_empty: bool = False) -> bytes:
    path = check_file(path, allow_empty)
    try:
        return path.read_bytes()
    except OSError as e:
        raise CodecError(f"{path}: cannot read ({e.strerror or e})") from None


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in the destination's folder, then rename it over ``path``.

    The temp file lives in the same folder so that ``os.replace`` is a rename on one file system: a crash leaves
    either the old file or the new one, never half of one.
    """
    path = Path(path)
    if path.is_dir():
        raise CodecError(f"{path}: is a directory, cannot write a file there")
    if not path.parent.exists():
        raise CodecError(f"{path}: folder {path.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes the file private (0600); a saved output should not be
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def as_token_array(tokens: Sequence[int] | np.ndarray, codec: Codec) -> np.ndarray:
    """Tokens as a 1-D int64 array, checked against the codec's vocabulary."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise CodecError(f"{codec.name} tokens must be 1-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise CodecError(f"{codec.name} tokens must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < 0) | (arr >= codec.vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise CodecError(
            f"{codec.name} token {int(arr[i])} at position {i} is outside the vocabulary [0, {codec.vocab_size})"
        )
    return arr
