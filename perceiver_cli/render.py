"""Turn model outputs into things people look at and listen to: audio, piano rolls, image grids and plots.

Audio comes from FluidSynth with a General MIDI soundfont when both are installed, otherwise from a small
built-in additive synth (harmonic partials with pitch-dependent exponential decay, in the spirit of the
classic additive piano models, e.g. Fletcher & Rossing, "The Physics of Musical Instruments", ch. 12).
Pictures are drawn with matplotlib's object API (``matplotlib.figure.Figure``, no pyplot global state) and
Pillow. Every file is written atomically: a temporary file in the target's directory, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pretty_midi
import soundfile
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "SOUNDFONT_PATHS",
    "image_grid",
    "plot_loss_curve",
    "plot_piano_roll",
    "plot_xy",
    "synth_backend",
    "synthesize",
    "upscale",
    "write_wav",
]

# Where Debian/Ubuntu packages (fluid-soundfont-gm, timgm6mb-soundfont, …) put a General MIDI soundfont.
SOUNDFONT_PATHS = (
    Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),
    Path("/usr/share/sounds/sf2/default-GM.sf2"),
    Path("/usr/share/soundfonts/default.sf2"),
)
SOUNDFONT_ENV = "PERCEIVER_SOUNDFONT"
PEAK = 0.9  # normalised peak: headroom so that 16-bit conversion and resampling never clip


# --------------------------------------------------------------------------------------------------------------
# Atomic writes


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory so that ``os.replace`` is a rename on one filesystem, and
    it keeps the target's suffix so that writers which infer the format from the name (soundfile) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes the file 0600; give the result the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_figure(fig, path: str | os.PathLike) -> None:
    with _atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)


def _save_image(image: Image.Image, path: str | os.PathLike) -> None:
    with _atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# --------------------------------------------------------------------------------------------------------------
# Audio


def _find_soundfont() -> Path | None:
    env = os.environ.get(SOUNDFONT_ENV)
    if env:
        # A soundfont the user named but that is missing is an error, not a reason to quietly sound different.
        if not Path(env).is_file():
            raise FileNotFoundError(f"{SOUNDFONT_ENV}={env}: no such soundfont file")
        return Path(env)
    return next((p for p in SOUNDFONT_PATHS if p.is_file()), None)


def synth_backend() -> str:
    """Which backend ``synthesize`` picks on this machine: "fluidsynth" or "builtin"."""
    return "fluidsynth" if shutil.which("fluidsynth") and _find_soundfont() else "builtin"


def _normalise(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float64)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 0:
        audio = audio * (PEAK / peak)
    return audio.astype(np.float32)


def _fluidsynth(pm: pretty_midi.PrettyMIDI, sample_rate: int) -> np.ndarray:
    fluidsynth, soundfont = shutil.which("fluidsynth"), _find_soundfont()
    if not fluidsynth or not soundfont:
        raise RuntimeError("fluidsynth backend: needs the `fluidsynth` binary on PATH and a General MIDI soundfont")
    with tempfile.TemporaryDirectory(prefix="perceiver-synth-") as tmp:
        mid, wav = Path(tmp, "in.mid"), Path(tmp, "out.wav")
        pm.write(str(mid))
        cmd = [fluidsynth, "-ni", "-F", str(wav), "-r", str(sample_rate), str(soundfont), str(mid)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wav.is_file():
            tail = (proc.stderr or proc.stdout).strip()[-300:]
            raise RuntimeError(f"fluidsynth with {soundfont}: exit code {proc.returncode}: {tail}")
        audio, sr = soundfile.read(str(wav), dtype="float32", always_2d=True)
    if sr != sample_rate:
        raise RuntimeError(f"fluidsynth with {soundfont}: wrote {sr} Hz, asked for {sample_rate} Hz")
    return audio.mean(axis=1)


# Built-in synth parameters. Partial k has amplitude 1/k**1.5 and decays (1 + 0.5 (k-1)) times faster than the
# fundamental, so notes start bright and mellow out, as struck strings do.
_PARTIALS = 6
_ATTACK_S = 0.004  # hammer: a few ms, long enough to avoid a click
_RELEASE_S = 0.08  # damper: a short fade after note-off (or pedal-up)
_QUIET = 5.0  # stop computing a note after this many decay constants (exp(-5) ≈ -43 dB)


def _decay_seconds(pitch: int) -> float:
    """Decay constant of the fundamental: low strings ring for seconds, the top octave for a fraction."""
    return float(np.clip(2.5 * 2.0 ** (-(pitch - 60) / 18.0), 0.25, 6.0))


def _tone(pitch: int, length: int, sample_rate: int) -> np.ndarray:
    """The sound of one pitch at full velocity with the key held: attack, then per-partial exponential decay."""
    t = np.arange(length, dtype=np.float64) / sample_rate
    freq = pretty_midi.note_number_to_hz(pitch)
    theta = 2.0 * np.pi * freq * t
    tau = _decay_seconds(pitch)
    fundamental_decay = np.exp(-t / tau)
    extra_decay = np.exp(-0.5 * t / tau)  # each higher partial decays this much more than the one below
    # sin(kθ) by the Chebyshev recurrence s_k = 2cos(θ) s_{k-1} - s_{k-2}: two transcendental calls per sample
    # instead of one per partial.
    two_cos = 2.0 * np.cos(theta)
    s_prev, s_k = np.zeros_like(theta), np.sin(theta)
    decay = fundamental_decay
    out = np.zeros_like(theta)
    for k in range(1, _PARTIALS + 1):
        if k * freq >= 0.45 * sample_rate:  # partials above Nyquist would alias
            break
        out += (k**-1.5) * decay * s_k
        s_prev, s_k = s_k, two_cos * s_k - s_prev
        decay = decay * extra_decay
    attack = min(length, max(1, int(_ATTACK_S * sample_rate)))
    out[:attack] *= np.linspace(0.0, 1.0, attack, endpoint=False)
    return out


def _pedal_intervals(instrument: pretty_midi.Instrument, end_time: float) -> np.ndarray:
    """(n, 2) array of [down, up) times of the sustain pedal (CC64 ≥ 64 is down, as in the MIDI spec)."""
    intervals, down = [], None
    for cc in sorted((c for c in instrument.control_changes if c.number == 64), key=lambda c: c.time):
        if cc.value >= 64 and down is None:
            down = cc.time
        elif cc.value < 64 and down is not None:
            intervals.append((down, cc.time))
            down = None
    if down is not None:  # pedal still held when the file ends
        intervals.append((down, max(end_time, down)))
    return np.asarray(intervals, dtype=np.float64).reshape(-1, 2)


def _sounding_end(instrument: pretty_midi.Instrument, ends: np.ndarray, end_time: float) -> np.ndarray:
    """Note-off times pushed to pedal-up where the sustain pedal is down at note-off."""
    pedal = _pedal_intervals(instrument, end_time)
    if not len(pedal):
        return ends
    i = np.searchsorted(pedal[:, 0], ends, side="right") - 1  # last pedal-down at or before each note-off
    held = (i >= 0) & (ends < pedal[np.maximum(i, 0), 1])
    return np.where(held, np.maximum(ends, pedal[np.maximum(i, 0), 1]), ends)


def _builtin(pm: pretty_midi.PrettyMIDI, sample_rate: int) -> np.ndarray:
    release = max(1, int(_RELEASE_S * sample_rate))
    end_time = pm.get_end_time()
    out = np.zeros(int(math.ceil(end_time * sample_rate)) + release + 1, dtype=np.float64)
    fade = np.linspace(1.0, 0.0, release)

    # Gather every note as (pitch, start sample, sounding samples, amplitude) first, so that each pitch's tone
    # is computed once, as long as its longest note, and every note is just a scaled slice of it.
    pitches, starts, lengths, amps = [], [], [], []
    for instrument in pm.instruments:
        if instrument.is_drum or not instrument.notes:  # drum kits are not pitched; the built-in synth skips them
            continue
        notes = instrument.notes
        ends = _sounding_end(instrument, np.array([n.end for n in notes]), end_time)
        for note, end in zip(notes, ends, strict=True):
            start = int(round(note.start * sample_rate))
            held = int(round((end - note.start) * sample_rate))
            held = min(held, int(_QUIET * _decay_seconds(note.pitch) * sample_rate))
            pitches.append(note.pitch)
            starts.append(start)
            lengths.append(max(held, 0) + release)
            amps.append((note.velocity / 127.0) ** 1.6)  # roughly perceptual: soft notes are much quieter

    longest: dict[int, int] = {}
    for pitch, length in zip(pitches, lengths, strict=True):
        longest[pitch] = max(longest.get(pitch, 0), length)
    tones = {pitch: _tone(pitch, length, sample_rate) for pitch, length in longest.items()}

    for pitch, start, length, amp in zip(pitches, starts, lengths, amps, strict=True):
        tone = tones[pitch]
        body = length - release
        out[start : start + body] += amp * tone[:body]
        out[start + body : start + length] += amp * tone[body:length] * fade
    return out


_BACKENDS: dict[str, Callable[[pretty_midi.PrettyMIDI, int], np.ndarray]] = {
    "fluidsynth": _fluidsynth,
    "builtin": _builtin,
}


def synthesize(pm: pretty_midi.PrettyMIDI, sample_rate: int = 22050, *, backend: str | None = None) -> np.ndarray:
    """Render ``pm`` to float32 mono audio, peak-normalised to 0.9 (silence stays silent).

    ``backend`` is "fluidsynth", "builtin" or None for ``synth_backend()``'s choice. The result is about
    ``pm.get_end_time() * sample_rate`` samples long plus a short release tail (FluidSynth adds its reverb tail).
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate={sample_rate} must be positive")
    name = backend if backend is not None else synth_backend()
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {sorted(_BACKENDS)}")
    return _normalise(_BACKENDS[name](pm, sample_rate))


def write_wav(audio: np.ndarray, sample_rate: int, path: str | os.PathLike) -> None:
    """Write ``audio`` (float, (frames,) or (frames, channels), nominal range [-1, 1]) as 16-bit PCM WAV."""
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2):
        raise ValueError(f"{path}: audio must be (frames,) or (frames, channels), got shape {audio.shape}")
    # libsndfile wraps rather than clips out-of-range floats when converting to PCM; clip here instead.
    audio = np.clip(audio.astype(np.float32), -1.0, 1.0)
    with _atomic_path(path) as tmp:
        soundfile.write(str(tmp), audio, sample_rate, subtype="PCM_16", format="WAV")


# --------------------------------------------------------------------------------------------------------------
# Pictures


def _figure(width: float, height: float):
    # Figure without pyplot: no global state, no GUI backend, safe in threads and in tests.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _pitch_label(pitch: int) -> str:
    return pretty_midi.note_number_to_name(pitch)


def plot_piano_roll(
    pm: pretty_midi.PrettyMIDI,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    prompt_seconds: float | None = None,
) -> None:
    """Draw ``pm`` as a piano roll PNG: seconds across, the used pitch range up, velocity as colour.

    A sustain-pedal strip (CC64) appears under the roll when the file has pedal events; ``prompt_seconds`` shades
    the prompt and marks where the continuation starts.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import Normalize

    notes = [(n.start, n.end, n.pitch, n.velocity) for inst in pm.instruments for n in inst.notes]
    pedals = [_pedal_intervals(inst, pm.get_end_time()) for inst in pm.instruments]
    pedal = np.concatenate(pedals) if pedals else np.zeros((0, 2))
    end = max(pm.get_end_time(), prompt_seconds or 0.0, 1e-3)
    end = end if notes or pedal.size else max(end, 1.0)

    fig = _figure(12, 5 if pedal.size else 4.5)
    if pedal.size:
        ax, pedal_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [12, 1]})
    else:
        ax, pedal_ax = fig.subplots(1, 1), None

    norm, cmap = Normalize(0, 127), colormaps["viridis"]
    if notes:
        arr = np.array(notes, dtype=np.float64)
        start, stop, pitch, velocity = arr.T
        # One PolyCollection instead of a Rectangle per note: thousands of notes draw in milliseconds.
        verts = np.stack(
            [
                np.stack([start, pitch - 0.4], 1),
                np.stack([stop, pitch - 0.4], 1),
                np.stack([stop, pitch + 0.4], 1),
                np.stack([start, pitch + 0.4], 1),
            ],
            axis=1,
        )  # (notes, 4 corners, xy)
        ax.add_collection(
            PolyCollection(verts, facecolors=cmap(norm(velocity)), edgecolors="black", linewidths=0.2)
        )
        low, high = int(pitch.min()), int(pitch.max())
        fig.colorbar(ScalarMappable(norm, cmap), ax=[ax, pedal_ax] if pedal_ax else ax, label="velocity", pad=0.01)
    else:
        low, high = 60, 72
        ax.text(0.5, 0.5, "no notes", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_ylim(low - 1.5, high + 1.5)
    ax.set_xlim(0, end)
    # Label every C in range (plus the extremes when the range holds no C), like the keys on a keyboard.
    ticks = [p for p in range(low, high + 1) if p % 12 == 0] or [low, high]
    ax.set_yticks(ticks, [_pitch_label(p) for p in ticks])
    ax.grid(axis="y", color="0.9", linewidth=0.5)
    ax.set_axisbelow(True)
    ax.set_ylabel("pitch")
    if title:
        # A figure title sits above the "prompt | continuation" label, wherever the prompt ends; an axes title
        # would share its line. Above the roll, the label never hides a note.
        fig.suptitle(title)

    if pedal_ax is not None:
        for down, up in pedal:
            pedal_ax.axvspan(down, up, color="tab:orange", alpha=0.6, linewidth=0)
        pedal_ax.set_yticks([])
        pedal_ax.set_ylabel("pedal", rotation=0, ha="right", va="center")
    (pedal_ax or ax).set_xlabel("time (s)")

    if prompt_seconds is not None:
        for a in (ax, pedal_ax) if pedal_ax is not None else (ax,):
            a.axvspan(0, prompt_seconds, color="grey", alpha=0.15, linewidth=0)
            a.axvline(prompt_seconds, color="tab:red", linewidth=1.2)
        ax.text(
            prompt_seconds,
            1.0,
            "prompt | continuation",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            color="tab:red",
            fontsize=9,
        )
    _save_figure(fig, path)


def upscale(image: Image.Image, scale: int) -> Image.Image:
    """Enlarge ``image`` by an integer factor with nearest-neighbour sampling, so pixels stay crisp squares."""
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale={scale!r} must be an integer ≥ 1")
    if scale == 1:
        return image.copy()
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def _label_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom + 2  # bbox is relative to the text origin; +2 px breathing room under the glyphs


def image_grid(
    images: Sequence[Image.Image],
    path: str | os.PathLike,
    *,
    columns: int | None = None,
    scale: int = 4,
    padding: int = 2,
    labels: Sequence[str] | None = None,
) -> None:
    """Tile ``images`` into one PNG, each upscaled by ``scale``, with ``padding`` white pixels around every cell.

    Cells are as large as the largest upscaled tile (plus a text line when ``labels`` are given), so the output is
    ``columns * cell_w + (columns + 1) * padding`` wide and ``rows * cell_h + (rows + 1) * padding`` high.
    ``columns`` defaults to ceil(sqrt(len(images))).
    """
    if not images:
        raise ValueError(f"{path}: image_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images")
    if padding < 0:
        raise ValueError(f"padding={padding} must be ≥ 0")
    columns = columns or math.ceil(math.sqrt(len(images)))
    if columns < 1:
        raise ValueError(f"columns={columns} must be ≥ 1")
    rows = math.ceil(len(images) / columns)

    tiles = [upscale(im.convert("RGB"), scale) for im in images]
    font = ImageFont.load_default()
    label_h = _label_height(font) if labels is not None else 0
    tile_w = max(t.width for t in tiles)
    tile_h = max(t.height for t in tiles)
    cell_w, cell_h = tile_w, tile_h + label_h

    grid = Image.new(
        "RGB", (columns * cell_w + (columns + 1) * padding, rows * cell_h + (rows + 1) * padding), "white"
    )
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        x = padding + c * (cell_w + padding)
        y = padding + r * (cell_h + padding)
        grid.paste(tile, (x + (tile_w - tile.width) // 2, y + (tile_h - tile.height) // 2))
        if labels is not None:
            draw.text((x + cell_w / 2, y + tile_h + 1), str(labels[i]), fill="black", font=font, anchor="ma")
    _save_image(grid, path)


NATS_PER_BIT = math.log(2.0)


def plot_loss_curve(records: Sequence[dict], path: str | os.PathLike, *, title: str | None = None) -> None:
    """Plot training loss (line) and validation loss (markers) against step; right axis in bits per token.

    ``records`` are dicts with "step" and "train_loss" and/or "val_loss" in nats/token (other keys are ignored).
    """
    train = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]

    fig = _figure(8, 4.5)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", linewidth=1.0, label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o", color="tab:orange", markersize=5, label="validation")
    if train or val:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss records", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.secondary_yaxis("right", functions=(lambda n: n / NATS_PER_BIT, lambda b: b * NATS_PER_BIT)).set_ylabel(
        "bits/token"
    )
    ax.grid(color="0.9", linewidth=0.5)
    if title:
        ax.set_title(title)
    _save_figure(fig, path)


def plot_xy(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
) -> None:
    """Plot each ``label: (xs, ys)`` of ``series`` as a line with markers; for benchmarks and model cards."""
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    for label, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"{path}: series {label!r} has {len(xs)} x values and {len(ys)} y values")
        ax.plot(xs, ys, "o-", markersize=4, linewidth=1.2, label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(color="0.9", linewidth=0.5, which="both")
    if series:
        ax.legend()
    if title:
        ax.set_title(title)
    _save_figure(fig, path)
