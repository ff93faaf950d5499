"""Tiny prepared MIDI datasets built in a temp dir: the training tests never need ../shared/data."""

from pathlib import Path

import pretty_midi
import pytest

from perceiver_cli.train.prepare import PrepareOptions, prepare


def write_scale_midi(path: Path, offset: int, notes: int = 60) -> None:
    """A deterministic, very learnable piece: rising scales with steady timing."""
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    for i in range(notes):
        pitch = 48 + offset + (i % 12)
        piano.notes.append(pretty_midi.Note(velocity=80, pitch=pitch, start=i * 0.1, end=i * 0.1 + 0.08))
    pm.instruments.append(piano)
    pm.write(str(path))


@pytest.fixture(scope="session")
def music_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("midi")
    for i in range(12):
        write_scale_midi(root / f"piece_{i:02d}.mid", offset=i % 3)
    (root / "broken.mid").write_bytes(b"MThd not really")
    out = tmp_path_factory.mktemp("prepared") / "music"
    prepare("music", [root], out, PrepareOptions(val_fraction=0.25))
    return out
