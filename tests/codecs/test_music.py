"""Music codec: golden vocabulary edges, sustain and the awkward cases, real MIDI files, property tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pretty_midi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perceiver_cli.codecs import CodecError, MusicCodec
from perceiver_cli.codecs.music import cut_midi, duration_seconds, load_midi, stretch_tokens, transpose_tokens

FIXTURES = Path(__file__).parent / "fixtures"
MAESTRO_FIXTURE = FIXTURES / "maestro_v3_validation_chopin_mazurka_op33no1_first30s.mid"
MUSIC21_FIXTURES = [FIXTURES / "music21_bach_bwv66.6.mid", FIXTURES / "music21_joplin_maple_leaf_rag.mid"]
MAESTRO_5MIN = Path(
    "/work/shared/data/midi/maestro/2008/MIDI-Unprocessed_12_R1_2008_01-04_ORIG_MID--AUDIO_12_R1_2008_wav--1.midi"
)

codec = MusicCodec()
ON, OFF, SHIFT, VEL, EOS, BOS = 0, 128, 256, 356, 388, 389


def midi(*notes, pedal=(), program=0, is_drum=False, extra=()) -> pretty_midi.PrettyMIDI:
    """A PrettyMIDI from (pitch, start, end, velocity) notes and (time, value) sustain changes."""
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=program, is_drum=is_drum)
    inst.notes = [pretty_midi.Note(v, p, s, e) for p, s, e, v in notes]
    inst.control_changes = [pretty_midi.ControlChange(64, v, t) for t, v in pedal]
    pm.instruments.append(inst)
    pm.instruments.extend(extra)
    return pm


def note_tuples(pm: pretty_midi.PrettyMIDI) -> list[tuple[int, float, float, int]]:
    notes = [n for inst in pm.instruments for n in inst.notes]
    return sorted((n.pitch, round(n.start, 6), round(n.end, 6), n.velocity) for n in notes)


# -- golden table: every range edge, both directions -----------------------------------------------------------


def test_vocabulary_table():
    assert [(r.kind, r.first, r.last) for r in codec.ranges] == [
        ("NOTE_ON", 0, 127),
        ("NOTE_OFF", 128, 255),
        ("TIME_SHIFT", 256, 355),
        ("VELOCITY", 356, 387),
        ("EOS", 388, 388),
        ("BOS", 389, 389),
    ]
    assert codec.vocab_size == 390
    assert (codec.eos_id, codec.bos_id) == (EOS, BOS)
    assert codec.special_ids == {EOS, BOS}


@pytest.mark.parametrize(
    ("token_id", "name"),
    [
        (0, "NOTE_ON(0)"),
        (127, "NOTE_ON(127)"),
        (128, "NOTE_OFF(0)"),
        (255, "NOTE_OFF(127)"),
        (256, "TIME_SHIFT(10ms)"),
        (355, "TIME_SHIFT(1000ms)"),
        (356, "VELOCITY(bin 0)"),
        (387, "VELOCITY(bin 31)"),
        (388, "EOS"),
        (389, "BOS"),
    ],
)
def test_token_names_at_range_edges(token_id, name):
    assert codec.token_name(token_id) == name


@pytest.mark.parametrize("bad", [-1, 390])
def test_token_name_outside_vocabulary(bad):
    with pytest.raises(CodecError, match=str(bad)):
        codec.token_name(bad)


@pytest.mark.parametrize(
    ("note", "tokens"),
    [
        # lowest pitch, lowest velocity, shortest shift
        ((0, 0.0, 0.01, 1), [VEL + 0, ON + 0, SHIFT + 0, OFF + 0]),
        # highest pitch, highest velocity, longest single shift
        ((127, 0.0, 1.0, 127), [VEL + 31, ON + 127, SHIFT + 99, OFF + 127]),
        # bin edges: velocity 4 is still bin 0, 5 is bin 1
        ((60, 0.0, 0.5, 4), [VEL + 0, ON + 60, SHIFT + 49, OFF + 60]),
        ((60, 0.0, 0.5, 5), [VEL + 1, ON + 60, SHIFT + 49, OFF + 60]),
        # a 2.5 s note: two full shifts and the remainder; an onset after silence gets its own shift
        ((60, 0.03, 2.53, 64), [SHIFT + 2, VEL + 15, ON + 60, SHIFT + 99, SHIFT + 99, SHIFT + 49, OFF + 60]),
    ],
)
def test_encode_golden(note, tokens):
    assert codec.encode(midi(note)).tolist() == tokens


@pytest.mark.parametrize(
    ("tokens", "note"),
    [
        ([VEL + 0, ON + 0, SHIFT + 0, OFF + 0], (0, 0.0, 0.01, codec.bin_to_velocity(0))),
        ([VEL + 31, ON + 127, SHIFT + 99, OFF + 127], (127, 0.0, 1.0, codec.bin_to_velocity(31))),
        ([SHIFT + 2, VEL + 15, ON + 60, SHIFT + 99, SHIFT + 99, SHIFT + 49, OFF + 60], (60, 0.03, 2.53, 63)),
    ],
)
def test_decode_golden(tokens, note):
    assert note_tuples(codec.decode(tokens)) == [note]


def test_velocity_bins_round_trip():
    for b in range(codec.num_velocity_bins):
        assert codec.velocity_to_bin(codec.bin_to_velocity(b)) == b
    assert codec.velocity_to_bin(1) == 0 and codec.velocity_to_bin(127) == 31


def test_ranges_follow_config():
    small = MusicCodec(steps_per_second=50, num_velocity_bins=16)
    assert small.vocab_size == 128 + 128 + 50 + 16 + 2
    assert small.range("TIME_SHIFT").size == 50
    assert small.token_name(small.time_shift.first) == "TIME_SHIFT(20ms)"
    assert small.config == {"name": "music", "steps_per_second": 50, "num_velocity_bins": 16}


@pytest.mark.parametrize("kwargs", [{"steps_per_second": 0}, {"num_velocity_bins": 0}, {"num_velocity_bins": 200}])
def test_bad_config(kwargs):
    with pytest.raises(CodecError, match=next(iter(kwargs))):
        MusicCodec(**kwargs)


# -- encoding rules -------------------------------------------------------------------------------------------


def test_note_offs_before_note_ons_at_equal_times():
    tokens = codec.encode(midi((60, 0.0, 0.5, 64), (64, 0.5, 1.0, 64))).tolist()
    assert tokens == [VEL + 15, ON + 60, SHIFT + 49, OFF + 60, ON + 64, SHIFT + 49, OFF + 64]


def test_velocity_token_only_when_bin_changes():
    pm = midi((60, 0.0, 0.1, 64), (62, 0.1, 0.2, 63), (64, 0.2, 0.3, 100))  # 64 and 63 share bin 15
    tokens = codec.encode(pm).tolist()
    assert [t for t in tokens if t >= VEL] == [VEL + 15, VEL + codec.velocity_to_bin(100)]


def test_times_quantised_to_10ms():
    notes = note_tuples(codec.decode(codec.encode(midi((60, 0.1234, 0.5678, 64)))))
    assert notes[0][1:3] == (0.12, 0.57)


def test_short_note_keeps_one_step():
    notes = note_tuples(codec.decode(codec.encode(midi((60, 0.1, 0.1001, 64)))))
    assert notes[0][1:3] == (0.1, 0.11)


def test_sustain_extends_to_pedal_release():
    pm = midi((60, 0.0, 0.2, 64), (62, 1.0, 1.2, 64), pedal=[(0.1, 127), (0.5, 0), (1.5, 100), (1.6, 0)])
    # released at 0.2 with the pedal down → sounds until 0.5; the second is released before its pedal
    assert [n[1:3] for n in note_tuples(codec.decode(codec.encode(pm)))] == [(0.0, 0.5), (1.0, 1.2)]


def test_pedal_below_64_does_not_sustain():
    pm = midi((60, 0.0, 0.2, 64), pedal=[(0.0, 63), (1.0, 0)])
    assert note_tuples(codec.decode(codec.encode(pm)))[0][2] == 0.2


def test_pedal_held_at_end_keeps_notes_until_the_piece_ends():
    pm = midi((60, 0.0, 0.2, 64), (64, 0.5, 0.7, 64), pedal=[(0.1, 127), (1.0, 127)])
    pm.instruments[0].control_changes.append(pretty_midi.ControlChange(1, 0, 2.0))  # piece ends at 2.0
    notes = note_tuples(codec.decode(codec.encode(pm)))
    assert [n[:3] for n in notes] == [(60, 0.0, 2.0), (64, 0.5, 2.0)]


def test_notes_after_the_last_pedal_release_are_kept():
    # krasserm/perceiver-io emits notes only at pedal releases and so loses everything after the last one
    pm = midi((60, 0.0, 0.2, 64), (62, 1.0, 1.5, 70), (64, 2.0, 2.5, 90), pedal=[(0.0, 127), (0.5, 0)])
    notes = note_tuples(codec.decode(codec.encode(pm)))
    assert [n[:3] for n in notes] == [(60, 0.0, 0.5), (62, 1.0, 1.5), (64, 2.0, 2.5)]


def test_restruck_pitch_while_sustained_ends_previous_note():
    pm = midi((60, 0.0, 0.1, 64), (60, 0.3, 0.4, 64), pedal=[(0.0, 127), (1.0, 0)])
    tokens = codec.encode(pm).tolist()
    assert tokens == [VEL + 15, ON + 60, SHIFT + 29, OFF + 60, ON + 60, SHIFT + 69, OFF + 60]


def test_overlapping_same_pitch_without_pedal():
    pm = midi((60, 0.0, 1.0, 64), (60, 0.5, 0.8, 64))
    assert [n[1:3] for n in note_tuples(codec.decode(codec.encode(pm)))] == [(0.0, 0.5), (0.5, 0.8)]


def test_same_pitch_struck_twice_in_one_step_is_one_note():
    pm = midi((60, 0.5, 1.0, 64), (60, 0.501, 0.9, 64))
    assert len(note_tuples(codec.decode(codec.encode(pm)))) == 1


def test_drums_dropped_and_instruments_merged():
    drums = pretty_midi.Instrument(program=0, is_drum=True)
    drums.notes = [pretty_midi.Note(100, 36, 0.0, 0.5)]
    violin = pretty_midi.Instrument(program=40)
    violin.notes = [pretty_midi.Note(80, 72, 0.25, 0.75)]
    pm = midi((60, 0.0, 0.5, 64), extra=[drums, violin])
    decoded = codec.decode(codec.encode(pm))
    assert len(decoded.instruments) == 1 and decoded.instruments[0].program == 0
    assert [n[:3] for n in note_tuples(decoded)] == [(60, 0.0, 0.5), (72, 0.25, 0.75)]


def test_pedal_applies_per_instrument():
    other = pretty_midi.Instrument(program=0)
    other.notes = [pretty_midi.Note(64, 62, 0.0, 0.2)]
    pm = midi((60, 0.0, 0.2, 64), pedal=[(0.0, 127), (1.0, 0)], extra=[other])
    assert [n[:3] for n in note_tuples(codec.decode(codec.encode(pm)))] == [(60, 0.0, 1.0), (62, 0.0, 0.2)]


def test_empty_midi_encodes_to_nothing():
    assert codec.encode(pretty_midi.PrettyMIDI()).tolist() == []
    assert note_tuples(codec.decode([])) == []


# -- decoding arbitrary sequences -------------------------------------------------------------------------------


def test_decode_unmatched_note_off_ignored():
    assert note_tuples(codec.decode([OFF + 60, SHIFT + 9, OFF + 61])) == []


def test_decode_closes_unreleased_notes_at_end():
    notes = note_tuples(codec.decode([ON + 60, SHIFT + 49, ON + 62, SHIFT + 49]))
    assert [n[:3] for n in notes] == [(60, 0.0, 1.0), (62, 0.5, 1.0)]


def test_decode_zero_length_note_gets_one_step():
    assert [n[:3] for n in note_tuples(codec.decode([ON + 60, OFF + 60]))] == [(60, 0.0, 0.01)]
    assert [n[:3] for n in note_tuples(codec.decode([ON + 60]))] == [(60, 0.0, 0.01)]


def test_decode_note_on_of_sounding_pitch_closes_previous():
    notes = note_tuples(codec.decode([ON + 60, SHIFT + 9, ON + 60, SHIFT + 9, OFF + 60]))
    assert [n[:3] for n in notes] == [(60, 0.0, 0.1), (60, 0.1, 0.2)]


def test_decode_skips_specials_and_out_of_vocabulary():
    tokens = [BOS, VEL + 20, ON + 60, 10_000, -5, SHIFT + 9, EOS, OFF + 60, EOS]
    assert [n[:3] for n in note_tuples(codec.decode(tokens))] == [(60, 0.0, 0.1)]
    assert codec.decode(np.array([BOS, EOS])).instruments[0].notes == []
    assert [n[:3] for n in note_tuples(codec.decode([ON + 60, 10**30, SHIFT + 9, OFF + 60]))] == [(60, 0.0, 0.1)]


def test_decode_default_velocity_before_any_velocity_token():
    assert note_tuples(codec.decode([ON + 60, SHIFT + 0, OFF + 60]))[0][3] == 64


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, codec.vocab_size - 1), max_size=300))
def test_decode_never_raises_and_reencoding_is_stable(tokens):
    pm = codec.decode(tokens)
    once = codec.encode(pm)
    assert codec.encode(codec.decode(once)).tolist() == once.tolist()


notes_strategy = st.lists(
    st.tuples(
        st.integers(0, 127),
        st.floats(0, 20, allow_nan=False),
        st.floats(0.001, 3, allow_nan=False),
        st.integers(1, 127),
    ),
    max_size=40,
)
pedal_strategy = st.lists(st.tuples(st.floats(0, 25, allow_nan=False), st.integers(0, 127)), max_size=8)


@settings(max_examples=150, deadline=None)
@given(notes_strategy, pedal_strategy)
def test_encode_decode_encode_is_a_fixed_point(notes, pedal):
    pm = midi(*[(p, s, s + d, v) for p, s, d, v in notes], pedal=pedal)
    tokens = codec.encode(pm)
    assert codec.encode(codec.decode(tokens)).tolist() == tokens.tolist()
    assert tokens.dtype == np.int64 and ((tokens >= 0) & (tokens < EOS)).all()


# -- real files nobody on the project wrote ---------------------------------------------------------------------


def reference_notes(pm: pretty_midi.PrettyMIDI) -> list[tuple[int, float, float, int]]:
    """Sustain applied event by event (note-seq's way, written independently of the codec), then re-strikes."""
    piece_end = pm.get_end_time()
    notes = []
    for inst in pm.instruments:
        if inst.is_drum:
            continue
        pedal = sorted((c.time, c.value >= 64) for c in inst.control_changes if c.number == 64)
        for n in inst.notes:
            end = n.end
            down = False
            for t, is_down in pedal:
                if t > n.end:
                    if down and not is_down:
                        end = t
                        break
                    continue
                down = is_down
            else:
                if down:
                    end = max(piece_end, n.end)
            notes.append([n.pitch, n.start, end, n.velocity])
    notes.sort(key=lambda n: (n[0], n[1], n[2]))  # a unison struck together keeps the longer note
    for a, b in zip(notes, notes[1:], strict=False):
        if a[0] == b[0]:
            a[2] = min(a[2], b[1])
    return sorted((p, s, e, v) for p, s, e, v in notes if round(e * 100) > round(s * 100))


@pytest.mark.parametrize("path", [MAESTRO_FIXTURE, *MUSIC21_FIXTURES], ids=lambda p: p.name)
def test_real_file_round_trip_within_one_step(path):
    ref = reference_notes(load_midi(path))
    got = note_tuples(codec.decode(codec.encode(path)))
    assert len(got) == len(ref) > 0
    for (p0, s0, e0, v0), (p1, s1, e1, v1) in zip(ref, got, strict=True):
        assert p0 == p1
        assert abs(s0 - s1) <= 0.010 + 1e-9
        assert abs(e0 - e1) <= 0.010 + 1e-9 or e1 - s1 == pytest.approx(0.01)  # shorter than a step: one step
        assert codec.velocity_to_bin(v0) == codec.velocity_to_bin(v1)


def test_maestro_fixture_has_pedal_held_at_the_end():
    pm = load_midi(MAESTRO_FIXTURE)
    pedal = [c for c in pm.instruments[0].control_changes if c.number == 64]
    assert pedal[-1].value >= 64  # the cut at 30 s falls while the pedal is down
    info = codec.inspect(MAESTRO_FIXTURE)
    assert info["notes"] == info["notes_in_file"] == 135
    assert info["duration_seconds"] == pytest.approx(30.0, abs=0.01)


def test_music21_chorale_merges_four_parts():
    pm = load_midi(MUSIC21_FIXTURES[0])
    assert len(pm.instruments) == 4
    decoded = codec.decode(codec.encode(pm))
    assert len(decoded.instruments) == 1
    assert len(decoded.instruments[0].notes) == len(reference_notes(pm))


@pytest.mark.skipif(not MAESTRO_5MIN.exists(), reason="shared MAESTRO data not present")
def test_five_minute_performance_encodes_whole():
    # its encode time is measured by `perceiver bench --codecs`, not here (timed tests flake on busy machines)
    tokens = codec.encode(MAESTRO_5MIN.read_bytes())
    assert duration_seconds(tokens) == pytest.approx(300.52, abs=0.02)


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.fixture()
def bad_files(tmp_path):
    real = MAESTRO_FIXTURE.read_bytes()
    files = {
        "truncated.mid": real[: len(real) // 2],
        "corrupt.mid": b"MThd\x00\x00\x00\x06\x00\x01\x00\x02\x01\xe0MTrk\xff\xff\xff\xff garbage",
        "empty.mid": b"",
        "notmidi.mid": b"\x89PNG\r\n\x1a\n not a midi file",
        "header_only.mid": b"MThd\x00\x00",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.mid").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("truncated.mid", "corrupt or truncated"),
        ("corrupt.mid", "corrupt or truncated"),
        ("header_only.mid", "corrupt or truncated"),
        ("empty.mid", "empty"),
        ("notmidi.mid", "not a MIDI file"),
        ("folder.mid", "directory"),
        ("missing.mid", "no such file"),
    ],
)
def test_bad_midi_names_the_file(bad_files, name, problem):
    with pytest.raises(CodecError, match=f"{name}.*{problem}"):
        codec.encode(bad_files / name)


def test_bad_source_type():
    with pytest.raises(CodecError, match="int"):
        codec.encode(42)


# -- helpers ------------------------------------------------------------------------------------------------------


def test_duration_seconds():
    assert duration_seconds([SHIFT + 99, ON + 60, SHIFT + 0, BOS, SHIFT + 49]) == pytest.approx(1.51)
    assert duration_seconds([]) == 0.0


def test_transpose_shifts_notes_and_drops_the_out_of_range_ones():
    tokens = [VEL + 3, ON + 60, ON + 126, SHIFT + 9, OFF + 60, OFF + 126, BOS]
    assert transpose_tokens(tokens, 2).tolist() == [VEL + 3, ON + 62, SHIFT + 9, OFF + 62, BOS]
    assert transpose_tokens(tokens, -61).tolist() == [VEL + 3, ON + 65, SHIFT + 9, OFF + 65, BOS]
    assert transpose_tokens(tokens, 0).tolist() == tokens


def test_stretch_identity_and_scaling():
    tokens = codec.encode(MAESTRO_FIXTURE)
    assert stretch_tokens(tokens, 1.0).tolist() == tokens.tolist()
    assert duration_seconds(stretch_tokens(tokens, 1.25)) == pytest.approx(
        1.25 * duration_seconds(tokens), abs=0.01
    )
    assert sorted(t for t in stretch_tokens(tokens, 0.8).tolist() if t < SHIFT) == sorted(
        t for t in tokens.tolist() if t < SHIFT
    )


def test_stretch_rounds_cumulative_times_so_errors_do_not_accumulate():
    tokens = [ON + 60, SHIFT + 0, OFF + 60] * 200  # 200 events 10 ms apart
    stretched = stretch_tokens(tokens, 1.5)
    assert duration_seconds(stretched) == pytest.approx(3.0)  # rounding each 15 ms gap alone would give 4.0 or 2.0
    assert stretched.tolist()[:6] == [ON + 60, SHIFT + 1, OFF + 60, ON + 60, SHIFT + 0, OFF + 60]


def test_stretch_keeps_trailing_silence_and_long_gaps():
    assert stretch_tokens([ON + 60, SHIFT + 99], 2.5).tolist() == [ON + 60, SHIFT + 99, SHIFT + 99, SHIFT + 49]
    assert stretch_tokens([], 2.0).tolist() == []
    with pytest.raises(CodecError, match="factor"):
        stretch_tokens([ON + 60], 0)


def test_augmentation_of_a_5000_token_training_window():
    tokens = np.resize(codec.encode(MAESTRO_FIXTURE), 5000)  # a window as the sampler cuts it (ends mid-piece)
    stretched = stretch_tokens(tokens, 1.1)
    # absolute times are re-quantised, never accumulated: the total is off by at most one shift step
    assert duration_seconds(stretched) == pytest.approx(
        1.1 * duration_seconds(tokens), abs=1 / codec.steps_per_second
    )
    up = transpose_tokens(tokens, 3)
    assert transpose_tokens(up, -3).tolist() == tokens.tolist()  # a piano piece stays inside 0-127 at ±3


def test_cut_first_and_last():
    pm = midi((60, 0.0, 2.0, 64), (62, 3.0, 4.0, 64), (64, 5.0, 8.0, 64), pedal=[(4.5, 127)])
    first = cut_midi(pm, 3.5, "first")
    assert [n[:3] for n in note_tuples(first)] == [(60, 0.0, 2.0), (62, 3.0, 3.5)]
    last = cut_midi(pm, 4.0, "last")  # from 4.0 to 8.0
    assert [n[:3] for n in note_tuples(last)] == [(64, 1.0, 4.0)]
    assert [(c.time, c.value) for c in last.instruments[0].control_changes] == [(0.5, 127)]
    later = cut_midi(pm, 3.0, "last")  # from 5.0: the pedal pressed at 4.5 is carried to time 0
    assert [(c.time, c.value) for c in later.instruments[0].control_changes] == [(0.0, 127)]
    with pytest.raises(CodecError, match="middle.*first.*last"):
        cut_midi(pm, 1.0, "middle")


def test_save_is_atomic_and_reloads(tmp_path):
    tokens = codec.encode(MAESTRO_FIXTURE)
    out = tmp_path / "out.mid"
    codec.save(codec.decode(tokens), out)
    assert codec.encode(out).tolist() == tokens.tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["out.mid"]
    with pytest.raises(CodecError, match="PrettyMIDI"):
        codec.save("not midi", tmp_path / "x.mid")
    with pytest.raises(CodecError, match="does not exist"):
        codec.save(pretty_midi.PrettyMIDI(), tmp_path / "nowhere" / "x.mid")


def test_inspect_counts_events_by_kind():
    info = codec.inspect(MUSIC21_FIXTURES[0])
    assert info["instruments"] == 4 and info["drum_instruments_dropped"] == 0
    assert info["events"]["NOTE_ON"] == info["events"]["NOTE_OFF"] == info["notes"]
    assert sum(info["events"].values()) == info["tokens"]


# -- PerformanceGuard: sampling-time limits ------------------------------------------------------------------


def test_guard_forces_the_release_of_an_overdue_note():
    import torch

    from perceiver_cli.codecs.music import PerformanceGuard

    codec = MusicCodec()
    guard = PerformanceGuard(codec, batch=2, max_note=1.0, max_silence=0)
    guard.observe([codec.note_on.first + 60, codec.note_on.first + 64])
    guard.observe([codec.time_shift.last, codec.time_shift.first])  # row 0: +1 s, row 1: +10 ms
    logits = guard(torch.zeros(2, codec.vocab_size))
    assert logits[0].argmax().item() == codec.note_off.first + 60 and logits[0].isfinite().sum() == 1
    assert logits[1].isfinite().all()  # row 1's note is young


def test_guard_bans_time_shifts_after_long_silence_only():
    import torch

    from perceiver_cli.codecs.music import PerformanceGuard

    codec = MusicCodec()
    guard = PerformanceGuard(codec, batch=1, max_note=0, max_silence=2.0)
    guard.observe_prompt(np.array([codec.bos_id, codec.time_shift.last, codec.time_shift.last]))  # 2 s of nothing
    logits = guard(torch.zeros(1, codec.vocab_size))
    assert not logits[0, codec.time_shift.first : codec.time_shift.last + 1].isfinite().any()
    assert logits[0, codec.note_on.first : codec.note_on.last + 1].isfinite().all()
    guard.observe([codec.note_on.first + 60])
    assert guard(torch.zeros(1, codec.vocab_size)).isfinite().all()  # a note sounds: time may pass again
