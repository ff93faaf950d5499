"""`perceiver bench --codecs`: encoding speed of each codec on realistic inputs (issue #3's targets).

music: a real ~5-minute expressive piano MIDI (the first MAESTRO file of 4-6 minutes under --midi-dir), parse
included; image: a 64x64 RGB PNG; text: 1 MB of English prose (a shipped-tokenizer encode). Best of 5.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pretty_midi
from PIL import Image

from ..codecs import ImageCodec, MusicCodec, TextCodec
from .core import best_time


def run(midi_dir: Path, tokenizer: Path, text_source: Path | None = None) -> list[dict]:
    rows = []
    music = MusicCodec()
    for path in sorted(midi_dir.rglob("*.mid*")):
        seconds = pretty_midi.PrettyMIDI(str(path)).get_end_time()
        if 240 <= seconds <= 360:
            data = path.read_bytes()
            tokens = len(music.encode(data))
            rows.append(
                {
                    "codec": "music",
                    "input": f"{path.name} ({seconds:.0f} s, {tokens:,} tokens)",
                    "seconds": best_time(lambda data=data: music.encode(data)),
                    "target_s": 0.2,
                }
            )
            break
    image = ImageCodec(64, 64)
    with tempfile.TemporaryDirectory() as scratch:
        png = Path(scratch) / "photo.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png)
        rows.append(
            {
                "codec": "image",
                "input": "64x64 RGB PNG file (64x64 codec), decode included",
                "seconds": best_time(lambda: image.encode(png)),
                "target_s": 0.01,
            }
        )
    text = TextCodec(tokenizer)
    if text_source is not None:
        from ..codecs.text import read_text

        prose = read_text(text_source)
    else:
        prose = "It was the best of times, it was the worst of times. " * 20_000
    while len(prose.encode()) < 1 << 20:  # a shorter book is repeated up to 1 MB
        prose += "\n\n" + prose
    prose = prose.encode()[: 1 << 20].decode("utf-8", errors="ignore")
    rows.append(
        {
            "codec": "text",
            "input": f"{len(prose.encode()):,} bytes of prose",
            "seconds": best_time(lambda: text.encode(prose)),
            "target_s": 1.0,
        }
    )
    return rows
