"""`perceiver bench`: the core benchmark, Perceiver AR against a decoder-only Transformer, in one run.

Config (issue #2): vocab 388, d_model 512, 8 heads, 1 cross-attention + 8 latent layers, N = 1024 latents;
the Transformer has the same width and 9 layers. fp32 (or --dtype), 2 threads, batch 1. Each measurement runs
in its own subprocess so that its peak resident memory (ru_maxrss) is its own; times are the best of a few
repetitions after one warm-up. Rows:
  prefill   one forward without grad over T tokens (T = 1k, 4k, 16k), logits for the last position(s)
  decode    tokens/s for 256 new tokens after a 4,096-token prompt (greedy), cached and uncached
  train     forward + backward + AdamW step at T = 4k and 16k; targets/s = trained positions per second
            (Perceiver AR trains its N latent positions, the Transformer all T)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import adamw, autocast, cpu_name, keep_freed_memory
from ..model import PerceiverAR, PerceiverARConfig, latent_loss, token_losses

VOCAB, D_MODEL, HEADS, LATENT_LAYERS, LATENTS = 388, 512, 8, 8, 1024


def bench_config(context: int) -> PerceiverARConfig:
    return PerceiverARConfig(
        vocab_size=VOCAB,
        max_context=max(context, LATENTS),
        num_latents=LATENTS,
        d_model=D_MODEL,
        num_heads=HEADS,
        num_layers=LATENT_LAYERS,
    )


def _build(impl: str, context: int, extra_positions: int = 0):
    torch.manual_seed(0)
    config = bench_config(context)
    if impl == "perceiver":
        return PerceiverAR(config)
    if impl in ("krasserm", "lucidrains"):
        from .peers import build

        return build(impl, context, extra_positions=extra_positions)
    from .transformer import Transformer

    return Transformer(config, num_layers=LATENT_LAYERS + 1)


def best_time(function, repeats: int = 5) -> float:
    """Best wall time of `repeats` calls after one warm-up call (allocator, kernels, caches).

    repeats=0 times the single first call: for steps so long that warm-up costs are lost in them."""
    if repeats == 0:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def run_case(case: dict) -> dict:
    """One measurement, in the current process. case: {kind, impl, context, dtype, threads, ...}."""
    torch.set_num_threads(case.get("threads", 2))
    dtype = torch.bfloat16 if case.get("dtype") == "bf16" else torch.float32
    device = torch.device("cpu")
    impl, kind, context = case["impl"], case["kind"], case["context"]
    model = _build(impl, context, case.get("new_tokens", 0) if kind == "decode" else 0)
    latent_model = impl != "transformer"  # the Perceiver ARs return logits for their N latents only
    if impl == "perceiver" and "recompute" in case:  # the long-context training path: auto, always or never
        model.recompute_prefix_above = {"always": 0, "never": 1 << 62}.get(
            case["recompute"], PerceiverAR.recompute_prefix_above
        )
    tokens = torch.randint(0, VOCAB, (1, context + 1), generator=torch.Generator().manual_seed(1))
    result = dict(case)
    if kind == "prefill":
        model.eval()

        def prefill():
            with torch.no_grad(), autocast(device, dtype):
                return model(tokens[:, :context]) if latent_model else model(tokens[:, :context], last_only=True)

        result["seconds"] = best_time(prefill, case.get("repeats", 3))
    elif kind == "decode":
        model.eval()
        new = case.get("new_tokens", 256)
        prompt = tokens[:, :context]
        if impl == "perceiver":
            from ..generate import generate

            def decode():
                with autocast(device, dtype):
                    generate(model, prompt, new, temperature=0, use_cache=case["cached"])
        else:

            def decode():
                with autocast(device, dtype):
                    model.decode(prompt, new)

        seconds = best_time(decode, case.get("repeats", 1))
        result.update(seconds=seconds, tokens_per_s=new / seconds)
    elif kind == "train":
        model.train()
        optimizer = adamw(list(model.parameters()), lr=1e-4)

        def step():
            with autocast(device, dtype):
                logits = model(tokens[:, :context])
            if latent_model:
                loss = latent_loss(logits, tokens[:, 1:])
            else:
                loss = token_losses(logits.flatten(0, 1), tokens[0, 1:]).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return logits.shape[1]

        trained = min(context, LATENTS) if latent_model else context
        seconds = best_time(step, case.get("repeats", 2))
        result.update(seconds=seconds, targets_per_s=trained / seconds)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


def _resident_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_isolated(case: dict, timeout: float = 1800, memory_limit_mib: float | None = None) -> dict:
    """run_case in a fresh interpreter, so that peak memory is per case.

    With memory_limit_mib the child is watched and killed once its resident memory passes the limit (an
    error row "memory limit" rather than a machine that swaps or an OOM kill of something else)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(case.get("threads", 2))}
    child = subprocess.Popen(
        [sys.executable, "-m", "perceiver_cli.bench.core", json.dumps(case)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # read the pipes on threads so a chatty child cannot block on a full pipe while we poll its memory
    outputs: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda name=name, pipe=pipe: outputs.__setitem__(name, pipe.read()), daemon=True)
        for name, pipe in (("stdout", child.stdout), ("stderr", child.stderr))
    ]
    for reader in readers:
        reader.start()
    started, peak, reason = time.monotonic(), 0.0, None
    while child.poll() is None:
        peak = max(peak, _resident_mib(child.pid))
        if memory_limit_mib is not None and peak > memory_limit_mib:
            reason = f"memory limit ({memory_limit_mib:,.0f} MiB) exceeded"
        elif time.monotonic() - started > timeout:
            reason = f"time limit ({timeout:,.0f} s) exceeded"
        if reason:
            child.kill()
            break
        time.sleep(0.1)
    child.wait()
    for reader in readers:
        reader.join()
    if reason:
        return {**case, "error": reason, "peak_rss_mib": peak, "seconds_before_stop": time.monotonic() - started}
    stdout, stderr = outputs.get("stdout", ""), outputs.get("stderr", "").strip()
    if child.returncode != 0 or not stdout.strip():
        return {**case, "error": stderr.splitlines()[-1] if stderr else f"failed (exit {child.returncode})"}
    return json.loads(stdout.strip().splitlines()[-1])


def core_cases(dtype: str = "fp32", threads: int = 2, quick: bool = False) -> list[dict]:
    base = {"dtype": dtype, "threads": threads}
    prefill = [1024, 4096] if quick else [1024, 4096, 16384]
    train = [4096] if quick else [4096, 16384]
    cases = []
    for impl in ("perceiver", "transformer"):
        cases += [{**base, "kind": "prefill", "impl": impl, "context": t} for t in prefill]
    cases += [
        {**base, "kind": "decode", "impl": "perceiver", "context": 4096, "cached": True, "new_tokens": 256},
        {
            **base,
            "kind": "decode",
            "impl": "perceiver",
            "context": 4096,
            "cached": False,
            "new_tokens": 32 if quick else 256,
        },
        {**base, "kind": "decode", "impl": "transformer", "context": 4096, "cached": True, "new_tokens": 256},
    ]
    for impl in ("perceiver", "transformer"):
        cases += [
            {**base, "kind": "train", "impl": impl, "context": t, "repeats": 1 if t > 4096 else 2} for t in train
        ]
    return cases


@dataclass
class Row:
    label: str
    perceiver: dict | None
    transformer: dict | None


def summarise(results: list[dict]) -> tuple[list[list[str]], list[str]]:
    """Markdown-ready table rows and the ratio lines against the issue's targets."""

    def find(kind, impl, context, cached=None):
        for r in results:
            if (
                r["kind"] == kind
                and r["impl"] == impl
                and r["context"] == context
                and r.get("cached", cached) == cached
            ):
                return r
        return None

    rows, ratios = [], []
    for t in sorted({r["context"] for r in results if r["kind"] == "prefill"}):
        p, x = find("prefill", "perceiver", t), find("prefill", "transformer", t)
        rows.append(
            [
                f"prefill T={t:,}",
                _fmt(p, "seconds", "s"),
                _fmt(x, "seconds", "s"),
                _ratio(x, p, "seconds"),
                _fmt(p, "peak_rss_mib", "MiB"),
                _fmt(x, "peak_rss_mib", "MiB"),
            ]
        )
        if t == 16384 and p and x and "seconds" in p and "seconds" in x:
            ratios.append(
                f"prefill 16k: Perceiver AR {x['seconds'] / p['seconds']:.1f}x faster than the Transformer (target >= 20x)"
            )
    pc, pu = find("decode", "perceiver", 4096, True), find("decode", "perceiver", 4096, False)
    xc = find("decode", "transformer", 4096, True)
    rows.append(
        [
            "decode after 4,096 (cached) tok/s",
            _fmt(pc, "tokens_per_s", ""),
            _fmt(xc, "tokens_per_s", ""),
            _ratio(pc, xc, "tokens_per_s"),
            _fmt(pc, "peak_rss_mib", "MiB"),
            _fmt(xc, "peak_rss_mib", "MiB"),
        ]
    )
    rows.append(
        [
            "decode after 4,096 (uncached) tok/s",
            _fmt(pu, "tokens_per_s", ""),
            "-",
            "-",
            _fmt(pu, "peak_rss_mib", "MiB"),
            "-",
        ]
    )
    if pc and pu and xc and all("tokens_per_s" in r for r in (pc, pu, xc)):
        ratios.append(
            f"cached decode: {pc['tokens_per_s'] / pu['tokens_per_s']:.1f}x uncached (target >= 20x), "
            f"{pc['tokens_per_s'] / xc['tokens_per_s']:.2f}x the Transformer (target >= 1.5x)"
        )
    for t in sorted({r["context"] for r in results if r["kind"] == "train"}):
        p, x = find("train", "perceiver", t), find("train", "transformer", t)
        rows.append(
            [
                f"train step T={t:,}",
                _fmt(p, "seconds", "s"),
                _fmt(x, "seconds", "s"),
                _ratio(x, p, "seconds"),
                _fmt(p, "peak_rss_mib", "MiB"),
                _fmt(x, "peak_rss_mib", "MiB"),
            ]
        )
        rows.append(
            [
                f"train targets/s T={t:,}",
                _fmt(p, "targets_per_s", ""),
                _fmt(x, "targets_per_s", ""),
                _ratio(p, x, "targets_per_s"),
                "",
                "",
            ]
        )
        if t == 16384 and p and x and "seconds" in p and "seconds" in x:
            ratios.append(
                f"train step 16k: {x['seconds'] / p['seconds']:.1f}x faster (target >= 10x), peak memory "
                f"{p['peak_rss_mib']:.0f} vs {x['peak_rss_mib']:.0f} MiB"
            )
    return rows, ratios


def _fmt(result: dict | None, key: str, unit: str) -> str:
    if result is None:
        return "-"
    if "error" in result:
        return f"error: {result['error'][:40]}"
    value = result.get(key)
    if value is None:
        return "-"
    text = f"{value:.3f}" if value < 10 else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return f"{text} {unit}".strip()


def _ratio(numerator: dict | None, denominator: dict | None, key: str) -> str:
    if not numerator or not denominator or key not in numerator or key not in denominator:
        return "-"
    return f"{numerator[key] / denominator[key]:.1f}x"


HEADER = ["measurement", "Perceiver AR", "Transformer", "ratio", "PAR peak RSS", "TF peak RSS"]


def markdown_table(rows: list[list[str]], header: list[str] = HEADER) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_time_and_memory(series_of, path, time_label: str, title: str) -> None:
    """PATH_time.png and PATH_memory.png against context; series_of(key, scale) -> {label: (xs, ys)} for the
    result keys "seconds" and "peak_rss_mib" (the latter shown in GiB)."""
    from ..render import plot_xy

    stem = Path(path)
    for key, scale, suffix, ylabel in (
        ("seconds", 1, "_time.png", time_label),
        ("peak_rss_mib", 1024, "_memory.png", "peak resident memory (GiB)"),
    ):
        plot_xy(
            series_of(key, scale),
            stem.with_name(stem.stem + suffix),
            xlabel="context (tokens)",
            ylabel=ylabel,
            title=title,
            logx=True,
            logy=True,
        )


def machine_line() -> str:
    return f"{cpu_name()}, torch {torch.__version__}, {os.cpu_count()} cores"


if __name__ == "__main__":
    # as the command line does at start (cli/__init__.py), so that a benchmark child measures what `perceiver`
    # runs: glibc keeps freed activations for reuse (BENCHMARKS.md "Keeping freed memory")
    if os.environ.get("PERCEIVER_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
