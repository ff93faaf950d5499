"""`perceiver prepare`, `perceiver train`, `perceiver eval`: thin wrappers over perceiver_cli.train."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .errors import UsageError, report_errors
from .options import CheckpointOpt, Device, Dtype, Force, Json, Latents, Quiet

stderr = Console(stderr=True)


def _progress(quiet: bool, *extra) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=quiet,
        transient=False,
    )


@report_errors
def prepare_command(
    modality: Annotated[str, typer.Argument(help="music | image | text")],
    inputs: Annotated[
        list[Path], typer.Option("--input", "-i", help="Folder(s) or file(s) to encode (repeatable).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Prepared data directory to write.")],
    val_fraction: Annotated[
        float, typer.Option(help="Fraction of files (not windows) held out for validation.")
    ] = 0.05,
    tokenizer: Annotated[Path | None, typer.Option(help="SentencePiece model for text.")] = None,
    tokenizer_vocab: Annotated[
        int | None, typer.Option(help="Text: train a SentencePiece tokenizer of this size on the training split.")
    ] = None,
    image_size: Annotated[int, typer.Option(help="Image: model resolution (square).")] = 32,
    crops: Annotated[int, typer.Option(help="Image: training crops per photo (each also flipped).")] = 8,
    workers: Annotated[int, typer.Option(help="Parallel worker processes.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the random crops.")] = 0,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Encode files into token shards with a deterministic train/validation split by file."""
    from ..train.prepare import PrepareOptions, prepare

    options = PrepareOptions(
        val_fraction=val_fraction, workers=workers, image_size=image_size, crops_per_image=crops, seed=seed
    )
    with _progress(quiet) as progress:
        task = progress.add_task(f"prepare {modality}", total=None)
        report = prepare(
            modality,
            inputs,
            out,
            options,
            tokenizer=tokenizer,
            tokenizer_vocab=tokenizer_vocab,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    for path, reason in report.skipped:
        stderr.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False)
    summary = {
        "out": str(out),
        "files": report.files,
        "tokens": report.tokens,
        "documents": report.documents,
        "skipped": len(report.skipped),
        "held_out": report.held_out,
    }
    if json_output:
        print(json.dumps(summary))
    else:
        print(
            f"{out}: train {report.files.get('train', 0)} files / {report.tokens.get('train', 0):,} tokens, "
            f"val {report.files.get('val', 0)} files / {report.tokens.get('val', 0):,} tokens; "
            f"{len(report.skipped)} skipped, {report.held_out} held out"
        )


@report_errors
def train_command(
    data: Annotated[Path, typer.Option("--data", "-d", help="Prepared data directory (perceiver prepare).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory: checkpoints last/ and best/, metrics.")],
    config: Annotated[str | None, typer.Option("--config", help="Preset (tiny|small|base) or a TOML file.")] = None,
    context: Annotated[int | None, typer.Option(help="Context length M (input tokens).")] = None,
    latents: Annotated[int | None, typer.Option(help="Latents N.")] = None,
    d_model: Annotated[int | None, typer.Option(help="Model width.")] = None,
    layers: Annotated[int | None, typer.Option(help="Latent self-attention layers.")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch (per process).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimiser step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    steps: Annotated[int | None, typer.Option(help="Total optimiser steps.")] = None,
    warmup: Annotated[int | None, typer.Option(help="Warmup steps.")] = None,
    prefix_dropout: Annotated[
        float | None, typer.Option(help="Fraction of prefix positions dropped in training.")
    ] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Validate every N steps.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    transpose: Annotated[int | None, typer.Option(help="Music: max transposition in semitones (0 = off).")] = None,
    stretch: Annotated[float | None, typer.Option(help="Music: max relative time stretch (0 = off).")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    init_from: Annotated[
        str | None,
        typer.Option(
            "--init-from",
            help="Start from this checkpoint's weights (name or folder): fine-tune a shipped model on your "
            "data, or train it further. Its architecture wins over the shape options.",
        ),
    ] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop (and save) after this many minutes.")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Train a Perceiver AR on prepared data; SIGINT/SIGTERM save before exiting; --resume continues exactly."""
    from ..train.config import load_train_config
    from ..train.loop import train

    overrides = dict(
        context=context,
        latents=latents,
        d_model=d_model,
        layers=layers,
        heads=heads,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        steps=steps,
        warmup=warmup,
        prefix_dropout=prefix_dropout,
        dropout=dropout,
        eval_every=eval_every,
        save_every=save_every,
        seed=seed,
        transpose=transpose,
        stretch=stretch,
        compile=compile,
        device=device,
        dtype=dtype,
    )
    train_config = load_train_config(config, overrides)
    primary = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    quiet = quiet or not primary
    columns = (
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[rate]} tok/s"),
    )
    with _progress(quiet, *columns) as progress:
        task = progress.add_task("train", total=train_config.steps, loss="-", val="-", rate="-")

        def update(record: dict) -> None:
            fields = {"completed": record["step"], "total": record["total_steps"]}
            if "train_loss" in record:
                fields.update(loss=f"{record['train_loss']:.3f}", rate=f"{record['targets_per_s']:,.0f}")
            if "val_loss" in record:
                fields["val"] = f"{record['val_loss']:.3f}"
            progress.update(task, **fields)

        result = train(
            data,
            out,
            train_config,
            resume=resume,
            init_from=init_from,
            on_progress=update,
            max_minutes=max_minutes,
            resume_steps=steps,
        )
    if not primary:
        return
    summary = {
        "run_dir": str(result.run_dir),
        "step": result.step,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "best_val_loss": result.best_val_loss,
        "elapsed_s": round(result.elapsed, 1),
        "targets_per_s": round(result.tokens_per_second, 1),
        "interrupted": result.interrupted,
    }
    if json_output:
        print(json.dumps(summary))
    else:
        state = "interrupted, saved" if result.interrupted else "done"
        # best/ appears at the first validation, which a run stopped early may not have reached
        saved = f"{out}/last and {out}/best" if (out / "best").is_dir() else f"{out}/last"
        print(
            f"{state} at step {result.step}: train loss {result.train_loss}, val loss {result.val_loss}; "
            f"checkpoints in {saved} (resume with --resume)"
        )
    if result.interrupted:
        raise typer.Exit(130)


@report_errors
def eval_command(
    checkpoint: CheckpointOpt = None,
    data: Annotated[
        list[Path] | None, typer.Option("--data", "-d", help="Prepared data dir (its val split) or files to score.")
    ] = None,
    split: Annotated[str, typer.Option(help="Split of a prepared data directory.")] = "val",
    latents: Latents = None,
    context: Annotated[int | None, typer.Option(help="Use at most this much context (≤ the model's).")] = None,
    max_documents: Annotated[int | None, typer.Option(help="Score only the first N documents.")] = None,
    max_document_tokens: Annotated[
        int | None,
        typer.Option(help="Score only each document's first N tokens (a quicker, still long-context check)."),
    ] = None,
    device: Device = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 (default: evaluate in fp32) | bf16 | auto.")] = "fp32",
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Held-out bits/token and the modality's unit (bits/dim, bits/byte, bits/event and bits/second)."""
    from ..checkpoint import load_checkpoint
    from ..device import resolve_device, resolve_dtype
    from ..train.evaluate import evaluate_documents
    from ..train.prepare import PreparedData

    if not data:
        raise UsageError("--data is required: a prepared data directory or files")
    target = resolve_device(device)
    compute = resolve_dtype(dtype, target)
    if checkpoint is None:  # the shipped checkpoint of the data's modality
        from ..checkpoint import DEFAULT_CHECKPOINTS

        first = data[0]
        modality = (
            PreparedData(first).codec.name if (first / "manifest.json").is_file() else _modality_of_file(first)
        )
        checkpoint = DEFAULT_CHECKPOINTS[modality]
    loaded = load_checkpoint(checkpoint, device=target)
    codec = loaded.codec
    if len(data) == 1 and data[0].is_dir() and (data[0] / "manifest.json").is_file():
        prepared = PreparedData(data[0])
        if prepared.codec.name != codec.name:
            raise UsageError(f"{data[0]} holds {prepared.codec.name} data but the checkpoint is {codec.name}")
        documents = prepared.documents(split)
    else:
        documents = []
        for path in data:
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such file")
            content = codec.encode(path)
            documents.append(np.concatenate([[codec.bos_id], content]))
    if max_documents:
        documents = documents[:max_documents]
    if max_document_tokens:
        documents = [d[:max_document_tokens] for d in documents]
    with _progress(quiet) as progress:
        task = progress.add_task("eval", total=len(documents))
        result = evaluate_documents(
            loaded.model,
            codec,
            documents,
            num_latents=latents,
            device=target,
            dtype=compute,
            max_context=context,
            on_progress=lambda done, total: progress.update(task, completed=done),
        )
    summary = {
        "checkpoint": str(loaded.path),
        "latents": latents or loaded.model.config.num_latents,
        "dtype": str(compute).replace("torch.", ""),
        **result.summary(),
    }
    if json_output:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}", file=sys.stdout)


@report_errors
def report_command(
    checkpoint: Annotated[str, typer.Option("--checkpoint", "-c", help="Checkpoint name or directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.json, report.md and the plots.")],
    eval_sets: Annotated[
        list[str] | None, typer.Option("--eval", help="NAME=PREPARED_DIR (its val split); repeatable.")
    ] = None,
    train_data: Annotated[
        Path | None, typer.Option("--train-data", help="Prepared dir whose train split fits the baselines.")
    ] = None,
    max_documents: Annotated[int, typer.Option(help="First N documents of each eval set (0 = all).")] = 16,
    max_document_tokens: Annotated[int, typer.Option(help="First N tokens of each document (0 = all).")] = 8192,
    latents: Annotated[
        list[int] | None, typer.Option("--latents", help="Latent counts to sweep (repeatable).")
    ] = None,
    contexts: Annotated[
        list[int] | None,
        typer.Option("--context", help="Context lengths for the long-context effect (repeatable)."),
    ] = None,
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16",
            help="Also score in bf16 autocast (default: only on CPUs with fast bf16, AVX512-BF16/AMX, or CUDA).",
        ),
    ] = None,
    refresh_decode: Annotated[
        bool,
        typer.Option(
            "--refresh-decode",
            help="Only measure again the decode speeds of the report in --out (both paths), keeping its bits.",
        ),
    ] = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Model-card numbers: held-out bits (fp32 and bf16) against baselines, and bits / speed vs --latents."""
    from ..train.report import make_report, refresh_decode_speeds, write_report

    if refresh_decode:
        if not (out / "report.json").is_file():
            raise FileNotFoundError(f"{out / 'report.json'}: no report to refresh")
        report = refresh_decode_speeds(json.loads((out / "report.json").read_text()), checkpoint)
        write_report(report, out)
        print((out / "report.md").read_text())
        return
    if not eval_sets or train_data is None:
        raise UsageError("perceiver report needs --eval NAME=DIR and --train-data DIR (or --refresh-decode)")
    if (out / "report.json").exists() and not force:  # checked before the minutes of scoring, not after
        raise FileExistsError(f"{out / 'report.json'} exists (use --force to replace the report)")

    sets = {}
    for item in eval_sets:
        if "=" not in item:
            raise UsageError(f"--eval {item!r}: expected NAME=PREPARED_DIR")
        name, directory = item.split("=", 1)
        sets[name] = Path(directory)
    report = make_report(
        checkpoint,
        sets,
        train_data,
        max_documents=max_documents or None,
        max_document_tokens=max_document_tokens or None,
        latents=latents,
        contexts=contexts,
        bf16=bf16,
        log=(lambda line: None) if quiet else (lambda line: stderr.print(line, highlight=False)),
    )
    write_report(report, out)
    print((out / "report.md").read_text())


@report_errors
def export_command(
    checkpoint: Annotated[str, typer.Option("--checkpoint", "-c", help="Training checkpoint (e.g. runs/x/best).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Checkpoint directory to write (e.g. checkpoints/music-v1).")
    ],
    dtype: Annotated[str, typer.Option(help="Weights dtype: bf16 | fp16 | fp32.")] = "bf16",
    data: Annotated[str | None, typer.Option(help="One-line description of the training data.")] = None,
    report: Annotated[
        Path | None, typer.Option(help="report.json whose first set becomes the held-out metric.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing checkpoint.")] = False,
) -> None:
    """Write a compact copy of a checkpoint for shipping (no optimizer state), with its card metadata."""
    import torch

    from ..checkpoint import load_checkpoint, save_checkpoint

    weights = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in weights:
        raise UsageError(f"--dtype {dtype!r}: choose from {', '.join(weights)}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to overwrite)")
    loaded = load_checkpoint(checkpoint)
    training = {k: v for k, v in loaded.meta.get("training", {}).items()}
    if data:
        training["data"] = data
    settings = training.get("train_config") or {}
    if "tokens_seen" not in training and settings and "step" in training:  # runs that saved a shorter record
        per_step = settings.get("batch_size", 0) * settings.get("grad_accum", 1) * training.get("world_size", 1)
        training["tokens_seen"] = training["step"] * per_step * loaded.model.config.max_context
        training["targets_seen"] = training["step"] * per_step * loaded.model.config.num_latents
    if report:
        summary = json.loads(report.read_text())
        unit = summary["unit"]
        name, entry = next(iter(summary["sets"].items()))
        training["heldout"] = {
            "metric": f"bits/{unit}",
            "value": round(entry["fp32"][f"bits_per_{unit}"], 4),
            "set": name,
        }
    import shutil
    import tempfile

    # the hand-written model card and its report folder survive a re-export
    keep = Path(tempfile.mkdtemp(prefix=".export.", dir=out.parent if out.parent.exists() else None))
    kept = [name for name in ("README.md", "report") if (out / name).exists()]
    for name in kept:
        shutil.move(str(out / name), str(keep / name))
    try:
        save_checkpoint(out, loaded.model, loaded.codec, training, dtype=weights[dtype])
    finally:
        for name in kept:
            shutil.move(str(keep / name), str(out / name))
        shutil.rmtree(keep, ignore_errors=True)
    size = (out / "model.safetensors").stat().st_size / 2**20
    print(f"{out}: {loaded.model.num_parameters():,} parameters, {size:.1f} MiB ({dtype})")


def _modality_of_file(path: Path) -> str:
    from ..train.prepare import EXTENSIONS

    for modality, suffixes in EXTENSIONS.items():
        if path.name.lower().endswith(suffixes):
            return modality
    raise UsageError(f"{path}: cannot tell its modality from the name; pass --checkpoint")


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
    app.command("export")(export_command)
    app.command("prepare")(prepare_command)
    app.command("train")(train_command)
    app.command("eval")(eval_command)
