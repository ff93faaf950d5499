"""`perceiver bench`: Perceiver AR vs a decoder-only Transformer in one run (see perceiver_cli/bench/core.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import UsageError, report_errors
from .options import Json, Quiet

stderr = Console(stderr=True)


@report_errors
def bench_command(
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 | bf16 (autocast).")] = "fp32",
    threads: Annotated[int, typer.Option(help="Torch threads.")] = 2,
    quick: Annotated[bool, typer.Option("--quick", help="Skip the 16k rows (a smoke run).")] = False,
    markdown: Annotated[Path | None, typer.Option(help="Also write the table (markdown) to this file.")] = None,
    efficiency: Annotated[
        bool, typer.Option("--efficiency", help="Measure against this machine's GEMM peak and memory bandwidth.")
    ] = False,
    copy_task: Annotated[
        bool, typer.Option("--copy-task", help="Train on the paper's copy task; report accuracy.")
    ] = False,
    length: Annotated[
        int, typer.Option(help="Copy task: sequence length L (L/2 random tokens, then a copy).")
    ] = 4096,
    minutes: Annotated[float, typer.Option(help="Copy task: training time budget in minutes.")] = 30.0,
    d_model: Annotated[int, typer.Option("--d-model", help="Copy task: model width.")] = 64,
    heads: Annotated[int, typer.Option(help="Copy task: attention heads.")] = 1,
    rotary_base: Annotated[
        float, typer.Option(help="Copy task: rotary base (wavelengths up to 2π·base).")
    ] = 2000.0,
    copy_zero_bias: Annotated[
        bool,
        typer.Option(
            "--copy-zero-bias", help="Copy task: start the LayerNorm biases at zero (reproduces the old plateau)."
        ),
    ] = False,
    codecs: Annotated[bool, typer.Option("--codecs", help="Codec encoding speed (music, image, text).")] = False,
    midi_dir: Annotated[Path, typer.Option(help="--codecs: where to find a ~5-minute MIDI.")] = Path(
        "../shared/data/midi/maestro"
    ),
    text_file: Annotated[Path, typer.Option(help="--codecs: a long book (its first 1 MB is encoded).")] = Path(
        "../shared/data/text/rcdm-uga_Gutenberg_Text/twain_adventures-of-huckleberry-finn-complete.txt.xz"
    ),
    generate: Annotated[
        bool, typer.Option("--generate", help="Wall time of generate music/image (shipped models).")
    ] = False,
    photo: Annotated[Path | None, typer.Option(help="--generate: the photo to complete.")] = None,
    train_speed: Annotated[bool, typer.Option("--train-speed", help="Training targets/s of a preset.")] = False,
    preset: Annotated[str, typer.Option(help="--train-speed: the preset.")] = "small",
    data: Annotated[Path | None, typer.Option(help="--train-speed, --step-weights: prepared data.")] = None,
    peers: Annotated[
        bool,
        typer.Option(
            "--peers", help="Side by side with krasserm's perceiver-io and lucidrains' perceiver-ar-pytorch."
        ),
    ] = False,
    long_context: Annotated[
        bool,
        typer.Option("--long-context", help="One training step from 131k to 2M tokens: time and peak memory."),
    ] = False,
    max_context: Annotated[
        bool,
        typer.Option(
            "--max-context",
            help="Largest context whose training step fits --memory-limit (Perceiver AR, Transformer).",
        ),
    ] = False,
    contexts: Annotated[
        list[int] | None, typer.Option("--context", help="--long-context: the contexts (repeatable).")
    ] = None,
    implementations: Annotated[
        list[str] | None, typer.Option("--impl", help="--max-context: perceiver and/or transformer (repeatable).")
    ] = None,
    start: Annotated[int, typer.Option(help="--max-context: first context of the doubling search.")] = 4096,
    stop: Annotated[int, typer.Option(help="--max-context: stop the search here.")] = 1 << 24,
    memory_limit: Annotated[float, typer.Option(help="Memory limit in GiB (the child is killed above it).")] = 24.0,
    time_limit: Annotated[float, typer.Option(help="Time limit per training step in seconds.")] = 900.0,
    plot: Annotated[
        Path | None, typer.Option(help="--long-context: write PLOT_time.png and PLOT_memory.png.")
    ] = None,
    step_weights: Annotated[
        bool,
        typer.Option(
            "--step-weights",
            help="Bits and tokens/s of cached decoding with fp32 vs bf16 step weights (needs -c and --data).",
        ),
    ] = False,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", "-c", help="--step-weights: the model.")] = None,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Prefill, cached/uncached decode and training step, each case in its own process (peak RSS per case)."""
    from ..bench.core import HEADER, core_cases, machine_line, markdown_table, run_isolated, summarise

    log = (lambda line: None) if quiet else (lambda line: stderr.print(line, highlight=False))
    if peers:
        from ..bench import peers as bench_peers

        missing = [impl for impl in bench_peers.PEERS if not bench_peers.available(impl)]
        if missing:
            raise UsageError(f"--peers needs {', '.join(missing)} installed: {bench_peers.INSTALL_HINT}")
        results = []
        for case in bench_peers.peer_cases(dtype, threads, quick):
            log(f"running {case['kind']} {case['impl']} T={case['context']}")
            results.append(run_isolated(case, timeout=time_limit, memory_limit_mib=memory_limit * 1024))
        header, rows, ratios = bench_peers.summarise_peers(results)
        if plot:
            bench_peers.plot_peers(results, plot)
        if json_output:
            print(json.dumps({"machine": machine_line(), "results": results, "ratios": ratios}))
        else:
            table = Table(
                title=f"perceiver bench --peers ({dtype}, {threads} threads, batch 1) on {machine_line()}"
            )
            for name in header:
                table.add_column(name)
            for row in rows:
                table.add_row(*row)
            Console().print(table)
            print("\n".join(ratios))
        if markdown:
            body = markdown_table(rows, header) + "\n\n" + "\n".join(f"- {line}" for line in ratios) + "\n"
            markdown.write_text(f"Machine: {machine_line()}; dtype {dtype}; {threads} threads; batch 1.\n\n{body}")
        return
    if long_context:
        from ..bench import long_context as bench_long

        rows = bench_long.long_context_table(
            contexts=contexts or bench_long.LONG_CONTEXTS,
            ordinary_contexts=[c for c in (contexts or bench_long.ORDINARY_CONTEXTS) if c <= 524_288],
            dtype=dtype,
            threads=threads,
            memory_limit_mib=memory_limit * 1024,
            timeout=time_limit,
            log=log,
        )
        if plot:
            bench_long.plot(rows, plot)
        if not json_output:
            print(bench_long.markdown(rows))
        _emit({"long_context": rows, "dtype": dtype, "threads": threads}, json_output, markdown)
        return
    if max_context:
        from ..bench import long_context as bench_long

        unknown = sorted(set(implementations or ()) - {"perceiver", "transformer"})
        if unknown:
            raise UsageError(f"--impl {unknown[0]}: choose perceiver or transformer")

        found = [
            bench_long.max_context(
                impl,
                start=start,
                stop=stop,
                dtype=dtype,
                threads=threads,
                memory_limit_mib=memory_limit * 1024,
                time_limit_s=time_limit,
                log=log,
            )
            for impl in implementations or ("perceiver", "transformer")
        ]
        if not json_output:
            for result in found:
                step = result["largest_step"]
                print(
                    f"{result['impl']}: largest context {result['largest_context'] or 0:,}"
                    + (f" ({step['seconds']:.1f} s, {step['peak_rss_mib'] / 1024:.2f} GiB)" if step else "")
                    + f"; next step stopped by: {result['stopped_by']}"
                )
        _emit({"max_context": found, "dtype": dtype, "threads": threads}, json_output, markdown)
        return
    if generate:
        from ..bench.usage import generate_times

        if photo is None:
            raise UsageError("--generate needs --photo PATH (a photo to complete)")
        rows = generate_times(photo)
        print(
            json.dumps(rows)
            if json_output
            else "\n".join(
                f"{r['command']:<50} seed {r['seed']}: {r['wall_s']:6.1f} s (target < {r['target_s']} s)"
                for r in rows
            )
        )
        return
    if train_speed:
        from ..bench.usage import train_speed as measure

        if data is None:
            raise UsageError("--train-speed needs --data PREPARED_DIR")
        print(json.dumps(measure(data, preset)))
        return
    if codecs:
        from ..bench.codecs import run as run_codecs
        from .codec import DEFAULT_TOKENIZER

        rows = run_codecs(midi_dir, DEFAULT_TOKENIZER, text_file if text_file.is_file() else None)
        if json_output:
            print(json.dumps(rows))
        else:
            table = Table(title=f"codec encoding speed on {machine_line()}")
            for name in ("codec", "input", "seconds", "target"):
                table.add_column(name)
            for row in rows:
                table.add_row(
                    row["codec"],
                    row["input"],
                    f"{row['seconds'] * 1000:.1f} ms",
                    f"< {row['target_s'] * 1000:.0f} ms",
                )
            Console().print(table)
        return
    if copy_task:
        import torch

        from ..bench.copy_task import run_copy_task

        torch.set_num_threads(threads)

        result = run_copy_task(
            length,
            d_model=d_model,
            heads=heads,
            rotary_base=rotary_base,
            bf16=dtype == "bf16",
            zero_bias=copy_zero_bias,
            max_minutes=minutes,
            log=(lambda line: None) if quiet else (lambda line: stderr.print(line, highlight=False)),
        )
        _emit(result, json_output, markdown)
        return
    if step_weights:
        from ..bench.step_weights import run

        if checkpoint is None or data is None:
            raise UsageError("--step-weights needs --checkpoint and --data (a prepared data directory)")
        result = run(
            checkpoint,
            data,
            threads=threads,
            log=(lambda line: None) if quiet else (lambda line: stderr.print(line, highlight=False)),
        )
        _emit(result, json_output, markdown)
        return
    if efficiency:
        from ..bench.efficiency import run

        results = run(
            context=4096 if quick else 16384,
            threads=threads,
            bf16=True if dtype == "bf16" else None,
            log=(lambda line: None) if quiet else (lambda line: stderr.print(line, highlight=False)),
        )
        _emit(results, json_output, markdown)
        return

    results = []
    for case in core_cases(dtype, threads, quick):
        if not quiet:
            stderr.print(
                f"running {case['kind']} {case['impl']} T={case['context']}"
                + (f" cached={case['cached']}" if "cached" in case else ""),
                highlight=False,
            )
        results.append(run_isolated(case))
    rows, ratios = summarise(results)
    if json_output:
        print(json.dumps({"machine": machine_line(), "results": results, "ratios": ratios}))
    else:
        table = Table(title=f"perceiver bench ({dtype}, {threads} threads, batch 1) on {machine_line()}")
        for name in HEADER:
            table.add_column(name)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        for line in ratios:
            print(line)
    if markdown:
        text = (
            f"Machine: {machine_line()}; dtype {dtype}; {threads} threads; batch 1.\n\n{markdown_table(rows)}\n\n"
        )
        text += "\n".join(f"- {line}" for line in ratios) + "\n"
        markdown.write_text(text)


def _emit(result: dict, json_output: bool, path: Path | None) -> None:
    """A JSON benchmark result on stdout (one line with --json), stamped with the machine, and optionally a file."""
    from ..bench.core import machine_line

    result["machine"] = machine_line()
    print(json.dumps(result, indent=None if json_output else 1))
    if path:
        path.write_text(json.dumps(result, indent=1) + "\n")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
