"""`perceiver generate music|image|text`: parse options, call runner.generate_file / runner.sample_batch, report.

Progress goes to stderr (a rich bar: tokens/s, ETA, seconds of music for music), results to stdout (the files
written, or the --json summary); `generate text` streams the continuation to stdout as it is generated instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from .. import runner
from .errors import UsageError, report_errors
from .options import CheckpointOpt, Device, Force, GenerateDtype, Json, Latents, OutPath, Quiet, Seed

app = typer.Typer(
    name="generate",
    help="Generate music, images or text with a Perceiver AR checkpoint.",
    no_args_is_help=True,
)

# Sampling and batch options of the three generate commands (the shared ones come from options.py).
Temperature = Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 is greedy.")]
TopK = Annotated[int | None, typer.Option("--top-k", help="Sample only from the k most likely tokens.")]
TopP = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling: the smallest set with mass ≥ p.")]
NumSamples = Annotated[
    int, typer.Option("--num-samples", "-n", help="Write this many samples into --out-dir (sample_0000.*, …).")
]
OutDir = Annotated[
    Path | None,
    typer.Option("--out-dir", help="Folder for --num-samples; rerunning continues where it stopped (index.jsonl)."),
]
BatchSize = Annotated[
    int, typer.Option("--batch-size", "-b", help="Sequences generated at once with --num-samples.")
]


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="generate")


# ----------------------------------------------------------------------------------------------------------
# Shared plumbing: progress bar, dispatch, reporting


def _progress_bar(quiet: bool, unit: str):
    """A rich Progress on stderr and a runner callback that updates it (None, None when quiet)."""
    if quiet:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    amount = (
        "{task.completed:.1f}/{task.total:.1f} s" if unit == "s" else "{task.completed:.0f}/{task.total:.0f} tokens"
    )
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn(amount),
        TextColumn("{task.fields[rate]:.0f} tokens/s"),
        TextColumn("{task.fields[samples]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    tasks: list = []  # added at the first report, when the total is known

    def update(p: runner.Progress) -> None:
        samples = f"{p.samples_done}/{p.num_samples} samples" if p.num_samples > 1 else ""
        if not tasks:
            tasks.append(bar.add_task("generating", total=p.total, rate=0.0, samples=samples))
        bar.update(tasks[0], completed=p.completed, total=p.total, rate=p.tokens_per_second, samples=samples)

    return bar, update


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def _run(
    modality: str,
    request: runner.Request,
    *,
    checkpoint: str | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    latents: int | None,
    num_samples: int,
    out: Path | None,
    out_dir: Path | None,
    batch_size: int,
    device: str,
    dtype: str,
    force: bool,
    quiet: bool,
    as_json: bool,
    on_text: Callable[[str], None] | None = None,
) -> None:
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples} must be >= 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be >= 1")
    batch_mode = out_dir is not None or num_samples > 1
    if batch_mode and out is not None:
        raise UsageError("--out names one output; with --num-samples use --out-dir")
    if batch_mode and out_dir is None:
        raise UsageError(f"--num-samples {num_samples} needs --out-dir DIR")
    options = runner.GenerateOptions(temperature, top_k, top_p, seed, latents, batch_size)
    loaded = runner.load(checkpoint, modality, device, dtype)
    streaming = on_text is not None and not batch_mode
    bar, update = _progress_bar(quiet or streaming, "s" if modality == "music" else "tokens")
    try:
        if bar is not None:
            bar.start()
        if batch_mode:
            summary = runner.sample_batch(
                loaded, request, options, num_samples, out_dir, force=force, on_progress=update
            )
        else:
            summary = runner.generate_file(
                loaded, request, options, out, force=force, on_progress=update, on_text=on_text
            )
    except runner.Interrupted as interrupted:
        if bar is not None:
            bar.stop()
        if interrupted.files:
            _say("kept partial output: " + ", ".join(str(p) for p in interrupted.files), quiet)
        raise
    finally:
        if bar is not None:
            bar.stop()
    if streaming:
        print(flush=True)  # end the streamed text's last line
    for notice in summary.notices:
        _say(f"note: {notice}", quiet)
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
        return
    if quiet:
        return
    done = f"{summary.tokens} tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:.0f} tokens/s), seed {summary.seed}"
    if summary.skipped:
        done += f"; {summary.skipped} samples were already done"
    listing = "\n".join(summary.files)
    if streaming:  # stdout holds the text itself
        _say(f"wrote {listing}\n{done}", quiet)
    else:
        print(listing)
        _say(done, quiet)


# ----------------------------------------------------------------------------------------------------------
# Commands


@app.command("music")
@report_errors
def music(
    seconds: Annotated[
        float, typer.Option("--seconds", "-s", help="Seconds of new music (the prompt not counted).")
    ] = 60.0,
    prompt: Annotated[Path | None, typer.Option("--prompt", "-p", help="A MIDI file to continue.")] = None,
    prompt_seconds: Annotated[
        float | None, typer.Option("--prompt-seconds", help="Use only this many seconds of the prompt.")
    ] = None,
    prompt_from: Annotated[
        str, typer.Option("--prompt-from", help="first | last: which end of the prompt --prompt-seconds keeps.")
    ] = "first",
    out: OutPath = None,
    no_audio: Annotated[bool, typer.Option("--no-audio", help="Do not render a .wav.")] = False,
    max_note: Annotated[
        float, typer.Option(help="Force a note's release after this many seconds (0 = never).")
    ] = 6.0,
    max_silence: Annotated[
        float, typer.Option(help="After this many seconds of silence the next event must start a note (0 = off).")
    ] = 2.0,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Do not draw the piano-roll .png.")] = False,
    checkpoint: CheckpointOpt = None,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    latents: Latents = None,
    num_samples: NumSamples = 1,
    out_dir: OutDir = None,
    batch_size: BatchSize = 1,
    device: Device = "auto",
    dtype: GenerateDtype = "auto",
    force: Force = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Piano music as MIDI (+ .wav and piano-roll .png), from scratch or continuing --prompt.

    Writes OUT (default music.mid), OUT.wav, OUT.png and, with a prompt, OUT.continuation.mid (the new part alone).
    """
    if prompt_seconds is not None and prompt is None:
        raise UsageError("--prompt-seconds needs --prompt FILE")
    if prompt_from not in ("first", "last"):
        raise UsageError(f"--prompt-from {prompt_from!r} is not one of first, last")
    request = runner.MusicRequest(
        seconds,
        prompt,
        prompt_seconds,
        prompt_from,
        audio=not no_audio,
        plot=not no_plot,
        max_note=max_note,
        max_silence=max_silence,
    )
    _run(
        "music", request, checkpoint=checkpoint, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        latents=latents, num_samples=num_samples, out=out, out_dir=out_dir, batch_size=batch_size, device=device,
        dtype=dtype, force=force, quiet=quiet, as_json=as_json,
    )  # fmt: skip


@app.command("image")
@report_errors
def image(
    prompt: Annotated[
        Path | None,
        typer.Option(
            "--prompt",
            "-p",
            help="An image to complete: any size or format; it is centre-cropped and resized to the model's resolution.",
        ),
    ] = None,
    keep_rows: Annotated[
        int | None, typer.Option("--keep-rows", help="Keep this many top rows of the prompt.")
    ] = None,
    keep: Annotated[
        float | None, typer.Option("--keep", help="Keep this fraction of the prompt's rows (default 0.5).")
    ] = None,
    out: OutPath = None,
    checkpoint: CheckpointOpt = None,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    latents: Latents = None,
    num_samples: NumSamples = 1,
    out_dir: OutDir = None,
    batch_size: BatchSize = 1,
    device: Device = "auto",
    dtype: GenerateDtype = "auto",
    force: Force = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """An image at the model's resolution (OUT, default image.png) and an 8x upscale (OUT.x8.png).

    Without --prompt the image is unconditional; with it, the top rows are kept exactly and the rest is generated.
    """
    if keep_rows is not None and keep is not None:
        raise UsageError("give --keep-rows or --keep, not both")
    if prompt is None and (keep_rows is not None or keep is not None):
        raise UsageError("--keep-rows/--keep need --prompt IMAGE")
    request = runner.ImageRequest(prompt, keep_rows, keep)
    _run(
        "image", request, checkpoint=checkpoint, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        latents=latents, num_samples=num_samples, out=out, out_dir=out_dir, batch_size=batch_size, device=device,
        dtype=dtype, force=force, quiet=quiet, as_json=as_json,
    )  # fmt: skip


@app.command("text")
@report_errors
def text(
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Text to continue.")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="A UTF-8 file to continue.")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Number of new tokens.")] = 1000,
    out: OutPath = None,
    checkpoint: CheckpointOpt = None,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    latents: Latents = None,
    num_samples: NumSamples = 1,
    out_dir: OutDir = None,
    batch_size: BatchSize = 1,
    device: Device = "auto",
    dtype: GenerateDtype = "auto",
    force: Force = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Continue a prompt (or start from nothing); the continuation streams to stdout unless --quiet/--json.

    OUT (default text.txt) holds the prompt followed by the continuation.
    """
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    request = runner.TextRequest(tokens, prompt, prompt_file)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    _run(
        "text", request, checkpoint=checkpoint, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        latents=latents, num_samples=num_samples, out=out, out_dir=out_dir, batch_size=batch_size, device=device,
        dtype=dtype, force=force, quiet=quiet, as_json=as_json, on_text=None if quiet or as_json else stream,
    )  # fmt: skip
