"""Compare generated music with real validation performances: notes per second, pitch range, velocity, note
length and polyphony. Real files are passed through the codec first (encode -> decode), so both sides are
seen the way the model sees music: sustain pedal folded into note lengths, times on the 10 ms grid.

    .venv/bin/python samples/music_stats.py samples/music/piece_*.mid  > samples/music/stats.md
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pretty_midi

from perceiver_cli.codecs import MusicCodec

MAESTRO = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "midi" / "maestro"


def stats(pm: pretty_midi.PrettyMIDI) -> dict[str, float]:
    notes = [n for inst in pm.instruments for n in inst.notes]
    if not notes:
        return {}
    pitch = np.array([n.pitch for n in notes])
    velocity = np.array([n.velocity for n in notes])
    length = np.array([n.end - n.start for n in notes])
    end = max(n.end for n in notes)
    grid = np.arange(0, end, 0.05)
    starts, ends = np.array([n.start for n in notes]), np.array([n.end for n in notes])
    polyphony = ((starts[None, :] <= grid[:, None]) & (ends[None, :] > grid[:, None])).sum(1)
    return {
        "notes/s": len(notes) / end,
        "pitch mean": pitch.mean(),
        "pitch 5-95%": float(np.percentile(pitch, 95) - np.percentile(pitch, 5)),
        "velocity mean": velocity.mean(),
        "velocity sd": velocity.std(),
        "note length median (s)": float(np.median(length)),
        "polyphony mean": float(polyphony[polyphony > 0].mean()) if (polyphony > 0).any() else 0.0,
    }


def table(groups: dict[str, list[dict]]) -> str:
    keys = list(next(iter(next(iter(groups.values())))).keys())
    lines = ["| set | files | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for name, rows in groups.items():
        means = [np.mean([r[k] for r in rows]) for k in keys]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    return "\n".join(lines)


def main(generated: list[Path]) -> None:
    codec = MusicCodec()
    with open(MAESTRO / "maestro-v3.0.0.csv", newline="") as handle:
        validation = [MAESTRO / r["midi_filename"] for r in csv.DictReader(handle) if r["split"] == "validation"]
    real = []
    for path in [p for p in validation if p.is_file()][:20]:
        pm = codec.decode(codec.encode(path))
        real.append(stats(pm))
    produced = [s for s in (stats(pretty_midi.PrettyMIDI(str(p))) for p in generated) if s]
    print(table({"MAESTRO validation (20 files, via codec)": real, "generated": produced}))


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
