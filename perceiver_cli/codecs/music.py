"""Piano performance codec: MIDI ↔ the MAESTRO event vocabulary of Music Transformer and Perceiver AR.

Based on the performance representation of Oore et al. 2018 ("This time with feeling") as used by Huang et al.
2018 (Music Transformer, section 4.2) and Hawthorne et al. 2022 (Perceiver AR, section 5.3): 128 NOTE_ON, 128
NOTE_OFF, 100 TIME_SHIFT (10 ms … 1 s) and 32 VELOCITY bins, here followed by EOS and BOS. Sustain pedal is
baked into note durations as magenta/note-seq's ``apply_sustain_control_changes`` does, except that notes still
sounding when the piece ends are kept (krasserm/perceiver-io drops every note after the last pedal release).
"""

from __future__ import annotations

import io
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pretty_midi

from perceiver_cli.codecs.base import Codec, CodecError, atomic_write, build_ranges, read_bytes, register_codec

SUSTAIN_CC = 64
MIN_VELOCITY, MAX_VELOCITY = 1, 127
DEFAULT_VELOCITY = 64  # used by decode when a sequence plays notes before any VELOCITY token
MAX_SHIFT_SECONDS = 1.0  # one TIME_SHIFT token covers at most one second; longer gaps take several

MidiSource = str | os.PathLike | bytes | pretty_midi.PrettyMIDI


@register_codec
class MusicCodec(Codec):
    """Expressive piano performance as NOTE_ON / NOTE_OFF / TIME_SHIFT / VELOCITY events."""

    name = "music"

    def __init__(self, steps_per_second: int = 100, num_velocity_bins: int = 32):
        if not (isinstance(steps_per_second, int) and 1 <= steps_per_second <= 1000):
            raise CodecError(f"music codec: steps_per_second={steps_per_second!r} is outside [1, 1000]")
        if not (isinstance(num_velocity_bins, int) and 1 <= num_velocity_bins <= 127):
            raise CodecError(f"music codec: num_velocity_bins={num_velocity_bins!r} is outside [1, 127]")
        self.steps_per_second = steps_per_second
        self.num_velocity_bins = num_velocity_bins
        self.max_shift_steps = round(MAX_SHIFT_SECONDS * steps_per_second)
        self.ranges = build_ranges(
            [
                ("NOTE_ON", 128),
                ("NOTE_OFF", 128),
                ("TIME_SHIFT", self.max_shift_steps),
                ("VELOCITY", num_velocity_bins),
                ("EOS", 1),
                ("BOS", 1),
            ]
        )
        self.note_on, self.note_off, self.time_shift, self.velocity, eos, bos = self.ranges
        self.eos_id, self.bos_id = eos.first, bos.first
        # ceil so that velocity 127 lands in the last bin (note-seq's velocity_bin_size)
        self.velocity_bin_size = math.ceil((MAX_VELOCITY - MIN_VELOCITY + 1) / num_velocity_bins)
        self._step_seconds = 1.0 / steps_per_second

    @property
    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "steps_per_second": self.steps_per_second,
            "num_velocity_bins": self.num_velocity_bins,
        }

    # -- vocabulary ---------------------------------------------------------------------------------------------

    def velocity_to_bin(self, velocity: int | np.ndarray) -> int | np.ndarray:
        """Bin index 0 … num_velocity_bins-1 of a MIDI velocity 1 … 127."""
        return (np.clip(velocity, MIN_VELOCITY, MAX_VELOCITY) - MIN_VELOCITY) // self.velocity_bin_size

    def bin_to_velocity(self, velocity_bin: int) -> int:
        """The velocity in the middle of a bin, so that re-encoding lands in the same bin."""
        low = MIN_VELOCITY + velocity_bin * self.velocity_bin_size
        return min(MAX_VELOCITY, low + self.velocity_bin_size // 2)

    def token_name(self, token_id: int) -> str:
        r = self.range_of(token_id)
        offset = int(token_id) - r.first
        return _TOKEN_NAMES[r.kind](self, offset) if r.kind in _TOKEN_NAMES else r.kind

    # -- encode -------------------------------------------------------------------------------------------------

    def encode(self, source: MidiSource) -> np.ndarray:
        """Content tokens of a MIDI file, bytes or PrettyMIDI (all non-drum instruments as one piano, no BOS)."""
        pm = load_midi(source)
        pitch, start, end, velocity = self._notes(pm)
        return self._notes_to_tokens(pitch, start, end, velocity)

    def _notes(self, pm: pretty_midi.PrettyMIDI) -> tuple[np.ndarray, ...]:
        """Merged, pedal-extended, quantised notes as (pitch, start_step, end_step, velocity) arrays."""
        piece_end = pm.get_end_time()
        parts = [_sustained_notes(inst, piece_end) for inst in pm.instruments if not inst.is_drum]
        parts = [p for p in parts if len(p[0])]
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty, empty
        pitch, start_s, end_s, velocity = (np.concatenate(cols) for cols in zip(*parts, strict=True))
        start = np.floor(start_s * self.steps_per_second + 0.5).astype(np.int64)
        end = np.floor(end_s * self.steps_per_second + 0.5).astype(np.int64)
        end = np.maximum(end, start + 1)  # a note shorter than one step still sounds for one step

        # One stream cannot hold two sounding notes of one pitch: a re-strike (also across merged instruments)
        # ends the previous note. A note struck twice in the same step is one attack: keep the later.
        order = np.lexsort((end, start, pitch))
        pitch, start, end, velocity = pitch[order], start[order], end[order], velocity[order]
        same_next = np.zeros(len(pitch), dtype=bool)
        same_next[:-1] = pitch[:-1] == pitch[1:]
        next_start = np.empty_like(start)
        next_start[:-1] = start[1:]
        end = np.where(same_next, np.minimum(end, next_start), end)
        keep = end > start
        return pitch[keep], start[keep], end[keep], velocity[keep]

    def _notes_to_tokens(self, pitch, start, end, velocity) -> np.ndarray:
        n = len(pitch)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        # events sorted by time, note-offs before note-ons at equal times, then by pitch
        times = np.concatenate([end, start])
        is_on = np.concatenate([np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)])
        pitches = np.concatenate([pitch, pitch])
        bins = np.concatenate([np.full(n, -1), self.velocity_to_bin(velocity)])
        order = np.lexsort((pitches, is_on, times))
        times, is_on, pitches, bins = times[order], is_on[order], pitches[order], bins[order]
        tokens = np.where(is_on == 1, self.note_on.first + pitches, self.note_off.first + pitches)

        # a VELOCITY token only before note-ons whose bin differs from the previous note-on's
        on_idx = np.flatnonzero(is_on)
        on_bins = bins[on_idx]
        changed = np.ones(len(on_idx), dtype=bool)
        changed[1:] = on_bins[1:] != on_bins[:-1]
        at = on_idx[changed]
        tokens = np.insert(tokens, at, self.velocity.first + on_bins[changed])
        times = np.insert(times, at, times[at])
        return self._insert_time_shifts(tokens, times)

    def _insert_time_shifts(self, tokens: np.ndarray, times: np.ndarray, end_time: int | None = None) -> np.ndarray:
        """Interleave TIME_SHIFT tokens so that ``tokens[i]`` happens at step ``times[i]`` (non-decreasing).

        Gaps longer than the largest shift become several full shifts followed by the remainder. ``end_time``
        adds trailing shifts after the last token (used when re-timing a window that ends in silence).
        """
        if end_time is not None:
            last = int(times[-1]) if len(times) else 0
            tokens = np.append(tokens, -1)  # sentinel, removed below
            times = np.append(times, max(end_time, last))
        delta = np.diff(times, prepend=0)
        full, rem = np.divmod(delta, self.max_shift_steps)
        counts = full + (rem > 0) + 1
        ends = np.cumsum(counts)
        out = np.full(int(ends[-1]) if len(ends) else 0, self.time_shift.last, dtype=np.int64)
        out[ends - 1] = tokens
        has_rem = rem > 0
        out[ends[has_rem] - 2] = self.time_shift.first + rem[has_rem] - 1
        if end_time is not None:
            out = out[:-1]
        return out

    # -- decode -------------------------------------------------------------------------------------------------

    def decode(self, tokens: Sequence[int] | np.ndarray) -> pretty_midi.PrettyMIDI:
        """A one-piano PrettyMIDI for any token sequence; never raises on token content.

        Unreleased notes end with the sequence, NOTE_OFF without NOTE_ON is ignored, a NOTE_ON of a sounding pitch
        ends the previous note, zero-length notes last one step, and special or out-of-vocabulary ids are skipped.
        """
        notes = self._decode_notes(tokens)
        pm = pretty_midi.PrettyMIDI(initial_tempo=120.0)
        piano = pretty_midi.Instrument(program=0, name="Piano")
        dt = self._step_seconds
        piano.notes = [pretty_midi.Note(int(v), int(p), s * dt, e * dt) for p, s, e, v in notes]
        pm.instruments.append(piano)
        return pm

    def _decode_notes(self, tokens: Sequence[int] | np.ndarray) -> list[tuple[int, int, int, int]]:
        """(pitch, start_step, end_step, velocity) in onset order."""
        arr = np.asarray(tokens).reshape(-1)
        if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            # object/float input (e.g. ints too big for int64): keep the in-vocabulary integers only
            ok = [int(t) for t in arr.tolist() if isinstance(t, (int, np.integer)) and 0 <= t < self.vocab_size]
            arr = np.asarray(ok, dtype=np.int64)
        on0, off0, ts0, vel0 = self.note_on.first, self.note_off.first, self.time_shift.first, self.velocity.first
        vel_last = self.velocity.last
        t = 0
        velocity = DEFAULT_VELOCITY
        sounding: dict[int, tuple[int, int]] = {}  # pitch -> (start step, velocity)
        notes: list[tuple[int, int, int, int]] = []

        def close(p: int) -> None:
            s, v = sounding.pop(p)
            notes.append((p, s, max(t, s + 1), v))

        # a plain loop: sequences are at most a few 10k tokens and every rule is one line here
        for tok in arr.tolist():
            if tok < on0:
                continue
            if tok < off0:
                p = tok - on0
                if p in sounding:
                    if sounding[p][0] == t:  # struck twice in one step: one attack
                        del sounding[p]
                    else:
                        close(p)
                sounding[p] = (t, velocity)
            elif tok < ts0:
                if tok - off0 in sounding:
                    close(tok - off0)
            elif tok < vel0:
                t += tok - ts0 + 1
            elif tok <= vel_last:
                velocity = self.bin_to_velocity(tok - vel0)
        for p in list(sounding):
            close(p)
        notes.sort(key=lambda n: (n[1], n[0]))
        return notes

    # -- files --------------------------------------------------------------------------------------------------

    def save(self, obj: pretty_midi.PrettyMIDI, path: str | os.PathLike) -> None:
        if not isinstance(obj, pretty_midi.PrettyMIDI):
            raise CodecError(f"{path}: music codec saves a pretty_midi.PrettyMIDI, got {type(obj).__name__}")
        atomic_write(path, lambda tmp: obj.write(str(tmp)))

    def inspect(self, path: str | os.PathLike | pretty_midi.PrettyMIDI) -> dict[str, Any]:
        pm = load_midi(path)
        tokens = self.encode(pm)
        kinds = Counter(self.range_of(t).kind for t in tokens.tolist()) if len(tokens) else Counter()
        drums = [inst for inst in pm.instruments if inst.is_drum]
        return {
            "file": str(path) if not isinstance(path, pretty_midi.PrettyMIDI) else None,
            "instruments": len(pm.instruments),
            "drum_instruments_dropped": len(drums),
            "notes_in_file": sum(len(inst.notes) for inst in pm.instruments),
            "notes": int(kinds.get("NOTE_ON", 0)),
            "sustain_events": sum(
                1
                for inst in pm.instruments
                if not inst.is_drum
                for c in inst.control_changes
                if c.number == SUSTAIN_CC
            ),
            "duration_seconds": round(duration_seconds(tokens, self), 3),
            "tokens": int(len(tokens)),
            "events": {r.kind: int(kinds.get(r.kind, 0)) for r in self.ranges if r.kind in kinds},
        }


_TOKEN_NAMES: dict[str, Callable[[MusicCodec, int], str]] = {
    "NOTE_ON": lambda c, k: f"NOTE_ON({k})",
    "NOTE_OFF": lambda c, k: f"NOTE_OFF({k})",
    "TIME_SHIFT": lambda c, k: (
        f"TIME_SHIFT({(k + 1) * 1000 // c.steps_per_second}ms)"
        if 1000 % c.steps_per_second == 0
        else f"TIME_SHIFT({(k + 1) * 1000 / c.steps_per_second:g}ms)"
    ),
    "VELOCITY": lambda c, k: f"VELOCITY(bin {k})",
}


# ---------------------------------------------------------------------------------------------------------------
# Loading and sustain


def load_midi(source: MidiSource) -> pretty_midi.PrettyMIDI:
    """A PrettyMIDI from a path, raw bytes or PrettyMIDI; anything unreadable is a CodecError naming the source."""
    if isinstance(source, pretty_midi.PrettyMIDI):
        return source
    if isinstance(source, (bytes, bytearray)):
        label, data = "<bytes>", bytes(source)
        if not data:
            raise CodecError(f"{label}: MIDI data is empty")
    elif isinstance(source, (str, os.PathLike)):
        label, data = str(source), read_bytes(source)
    else:
        raise CodecError(f"music codec cannot encode a {type(source).__name__}; give a path, bytes or PrettyMIDI")
    # RIFF-wrapped MIDI (RMID) is rare enough to reject with the same message
    if not data.startswith(b"MThd"):
        raise CodecError(f"{label}: not a MIDI file (no MThd header)")
    try:
        return pretty_midi.PrettyMIDI(io.BytesIO(data))
    except Exception as e:  # mido/pretty_midi raise many types (OSError, EOFError, KeyError, ValueError …)
        raise CodecError(f"{label}: corrupt or truncated MIDI ({type(e).__name__}: {e})") from None


def _sustain_intervals(inst: pretty_midi.Instrument, piece_end: float) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) times of the sustain pedal; a pedal never released stays down until the piece ends."""
    downs: list[float] = []
    ups: list[float] = []
    is_down = False
    for cc in sorted((c for c in inst.control_changes if c.number == SUSTAIN_CC), key=lambda c: c.time):
        if cc.value >= 64 and not is_down:
            downs.append(cc.time)
            is_down = True
        elif cc.value < 64 and is_down:
            ups.append(cc.time)
            is_down = False
    if is_down:
        ups.append(max(piece_end, downs[-1]))
    return np.asarray(downs, dtype=np.float64), np.asarray(ups, dtype=np.float64)


def _sustained_notes(inst: pretty_midi.Instrument, piece_end: float) -> tuple[np.ndarray, ...]:
    """(pitch, start, end, velocity) with each release that falls while the pedal is down moved to the pedal-up."""
    notes = inst.notes
    pitch = np.fromiter((n.pitch for n in notes), dtype=np.int64, count=len(notes))
    start = np.fromiter((n.start for n in notes), dtype=np.float64, count=len(notes))
    end = np.fromiter((n.end for n in notes), dtype=np.float64, count=len(notes))
    velocity = np.fromiter((n.velocity for n in notes), dtype=np.int64, count=len(notes))
    end = np.maximum(end, start)
    downs, ups = _sustain_intervals(inst, piece_end)
    if len(downs):
        i = np.searchsorted(downs, end, side="right") - 1  # last pedal-down at or before the release
        held = (i >= 0) & (end < ups[np.maximum(i, 0)])
        end = np.where(held, ups[np.maximum(i, 0)], end)
    return pitch, start, end, velocity


# ---------------------------------------------------------------------------------------------------------------
# Token-stream helpers for the generate CLI and training-time augmentation (numpy, no Python loop per token)

_DEFAULT = MusicCodec()


def _shift_steps(tokens: np.ndarray, codec: MusicCodec) -> np.ndarray:
    ts = codec.time_shift
    return np.where((tokens >= ts.first) & (tokens <= ts.last), tokens - ts.first + 1, 0)


def duration_seconds(tokens: Sequence[int] | np.ndarray, codec: MusicCodec | None = None) -> float:
    """Total length of the time shifts in a token sequence, in seconds."""
    codec = codec or _DEFAULT
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    return float(_shift_steps(arr, codec).sum()) / codec.steps_per_second


def transpose_tokens(
    tokens: Sequence[int] | np.ndarray, semitones: int, codec: MusicCodec | None = None
) -> np.ndarray:
    """Shift every NOTE_ON/NOTE_OFF by ``semitones``; notes pushed outside 0–127 lose both their ON and OFF."""
    codec = codec or _DEFAULT
    arr = np.array(tokens, dtype=np.int64).reshape(-1)
    keep = np.ones(len(arr), dtype=bool)
    for r in (codec.note_on, codec.note_off):
        in_r = (arr >= r.first) & (arr <= r.last)
        pitch = arr - r.first + semitones
        keep &= ~in_r | ((pitch >= 0) & (pitch <= 127))
        arr = np.where(in_r, r.first + pitch, arr)
    return arr[keep]


def stretch_tokens(
    tokens: Sequence[int] | np.ndarray, factor: float, codec: MusicCodec | None = None
) -> np.ndarray:
    """Re-time a token sequence by ``factor`` (>1 slower), re-quantising absolute times.

    Each event's new time is round(factor × its original cumulative time), so rounding errors never accumulate
    across the sequence; trailing silence is stretched too.
    """
    codec = codec or _DEFAULT
    if not (factor > 0 and math.isfinite(factor)):
        raise CodecError(f"stretch factor {factor!r} must be a positive finite number")
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    steps = _shift_steps(arr, codec)
    cum = np.cumsum(steps)
    is_event = steps == 0
    events = arr[is_event]
    new_times = np.floor(cum[is_event] * factor + 0.5).astype(np.int64)
    total = int(np.floor((cum[-1] if len(cum) else 0) * factor + 0.5))
    if len(events) == 0:
        return codec._insert_time_shifts(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), total)
    return codec._insert_time_shifts(events, new_times, total)


# ---------------------------------------------------------------------------------------------------------------
# Cutting a performance (prompts and continuations)


def _cut_first(pm: pretty_midi.PrettyMIDI, seconds: float) -> pretty_midi.PrettyMIDI:
    out = pretty_midi.PrettyMIDI(initial_tempo=120.0)
    for inst in pm.instruments:
        new = pretty_midi.Instrument(inst.program, inst.is_drum, inst.name)
        new.notes = [
            pretty_midi.Note(n.velocity, n.pitch, n.start, min(n.end, seconds))
            for n in inst.notes
            if n.start < seconds
        ]
        new.control_changes = [
            pretty_midi.ControlChange(c.number, c.value, c.time) for c in inst.control_changes if c.time < seconds
        ]
        out.instruments.append(new)
    return out


def _cut_last(pm: pretty_midi.PrettyMIDI, seconds: float) -> pretty_midi.PrettyMIDI:
    cut = max(0.0, pm.get_end_time() - seconds)
    out = pretty_midi.PrettyMIDI(initial_tempo=120.0)
    for inst in pm.instruments:
        new = pretty_midi.Instrument(inst.program, inst.is_drum, inst.name)
        new.notes = [
            pretty_midi.Note(n.velocity, n.pitch, max(n.start, cut) - cut, n.end - cut)
            for n in inst.notes
            if n.end > cut
        ]
        # carry each controller's state at the cut (a pedal pressed before it is still down after it)
        state: dict[int, int] = {}
        later = []
        for c in sorted(inst.control_changes, key=lambda c: c.time):
            if c.time <= cut:
                state[c.number] = c.value
            else:
                later.append(pretty_midi.ControlChange(c.number, c.value, c.time - cut))
        new.control_changes = [pretty_midi.ControlChange(k, v, 0.0) for k, v in state.items()] + later
        out.instruments.append(new)
    return out


_CUTS: dict[str, Callable[[pretty_midi.PrettyMIDI, float], pretty_midi.PrettyMIDI]] = {
    "first": _cut_first,
    "last": _cut_last,
}


def cut_midi(pm: pretty_midi.PrettyMIDI, seconds: float, where: str = "first") -> pretty_midi.PrettyMIDI:
    """The first or last ``seconds`` of a performance; notes crossing the cut are clipped to it."""
    if where not in _CUTS:
        raise CodecError(f"cut_midi: where={where!r} is not one of {sorted(_CUTS)}")
    if not seconds > 0:
        raise CodecError(f"cut_midi: seconds={seconds!r} must be > 0")
    return _CUTS[where](pm, float(seconds))


# ---------------------------------------------------------------------------------------------------------------
# Sampling-time limits for generated performances


class PerformanceGuard:
    """Keeps sampled performances playable: a logits processor for `generate_stream` plus `observe(tokens)`.

    Small performance models sometimes forget to release a note (it then rings to the end) or drift into long
    silence. Two limits, both in seconds of music (0 turns one off): a note sounding for `max_note` seconds gets
    its NOTE_OFF forced, and after `max_silence` seconds with no note sounding TIME_SHIFT is banned so that the
    next event starts a note. The model sees the tokens that were actually emitted, so its context stays true.
    """

    def __init__(self, codec: MusicCodec, batch: int, max_note: float = 6.0, max_silence: float = 2.0):
        self.codec = codec
        self.max_note = round(max_note * codec.steps_per_second)
        self.max_silence = round(max_silence * codec.steps_per_second)
        self.time = [0] * batch  # in 10 ms steps
        self.onsets: list[dict[int, int]] = [{} for _ in range(batch)]
        self.quiet_since = [0] * batch

    def observe(self, tokens: Sequence[int] | np.ndarray) -> None:
        """One new token per row."""
        c = self.codec
        for row, token in enumerate(np.asarray(tokens).reshape(-1).tolist()):
            if c.time_shift.first <= token <= c.time_shift.last:
                self.time[row] += token - c.time_shift.first + 1
            elif c.note_on.first <= token <= c.note_on.last:
                self.onsets[row][token - c.note_on.first] = self.time[row]
            elif c.note_off.first <= token <= c.note_off.last:
                if self.onsets[row].pop(token - c.note_off.first, None) is not None and not self.onsets[row]:
                    self.quiet_since[row] = self.time[row]

    def observe_prompt(self, prompt: np.ndarray) -> None:
        """Feed a (B, T) or (T,) prompt, token by token."""
        prompt = np.atleast_2d(prompt)
        for column in range(prompt.shape[1]):
            self.observe(prompt[:, column])

    def __call__(self, logits):
        c = self.codec
        logits = logits.clone()
        for row in range(logits.shape[0]):
            now, onsets = self.time[row], self.onsets[row]
            overdue = [p for p, start in onsets.items() if self.max_note and now - start >= self.max_note]
            if overdue:
                forced = c.note_off.first + min(overdue, key=lambda p: onsets[p])
                keep = logits[row, forced].clone()
                logits[row] = float("-inf")
                logits[row, forced] = keep if keep.isfinite() else 0.0
            elif self.max_silence and not onsets and now - self.quiet_since[row] >= self.max_silence:
                logits[row, c.time_shift.first : c.time_shift.last + 1] = float("-inf")
        return logits
