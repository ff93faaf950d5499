"""`perceiver bench --long-context` and `--max-context`: one training step at very long contexts.

Both run one forward + backward + AdamW step of the bench config (core.py: d_model 512, 8 heads, N = 1,024
latents, 8 latent layers; batch 1, no prefix dropout, fp32 or --dtype) in a fresh subprocess per context, so
that each peak resident memory (VmRSS, polled, and ru_maxrss) is that context's own.

--long-context: the table of time and peak memory from 131,072 to 2,097,152 tokens, with the recomputing
    cross-attention (model.py: keys and values of the prefix recomputed chunk by chunk in the backward pass)
    and, where it fits, the ordinary path beside it, plus the marginal memory per token and a PNG plot.
--max-context: doubling search for the largest context whose step completes under a memory limit (24 GiB by
    default, this machine's RAM) and a time limit per step, for Perceiver AR and for the Transformer baseline;
    a row says which limit stopped the search.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .core import plot_time_and_memory, run_isolated

LONG_CONTEXTS = (131_072, 262_144, 524_288, 1_048_576, 2_097_152)
ORDINARY_CONTEXTS = (131_072, 262_144, 524_288)  # beyond this the ordinary path needs > 10 GiB here


def _step_case(impl: str, context: int, dtype: str, threads: int, recompute: str | None = None) -> dict:
    case = {"kind": "train", "impl": impl, "context": context, "dtype": dtype, "threads": threads, "repeats": 0}
    if recompute:
        case["recompute"] = recompute
    return case


def long_context_table(
    contexts=LONG_CONTEXTS,
    ordinary_contexts=ORDINARY_CONTEXTS,
    dtype: str = "fp32",
    threads: int = 2,
    memory_limit_mib: float = 24 * 1024,
    timeout: float = 1800,
    log: Callable[[str], None] = print,
) -> list[dict]:
    rows = []
    for path, chosen in (("recomputed", contexts), ("ordinary", ordinary_contexts)):
        for context in chosen:
            log(f"training step, {path} cross-attention, T={context:,}")
            case = _step_case("perceiver", context, dtype, threads, "always" if path == "recomputed" else "never")
            result = run_isolated(case, timeout=timeout, memory_limit_mib=memory_limit_mib)
            rows.append({**result, "path": path})
            log(_describe(rows[-1]))
    for path in ("recomputed", "ordinary"):
        done = [r for r in rows if r["path"] == path and "seconds" in r]
        for previous, row in zip(done, done[1:], strict=False):
            extra = (row["peak_rss_mib"] - previous["peak_rss_mib"]) * 1024 * 1024
            row["marginal_bytes_per_token"] = extra / (row["context"] - previous["context"])
    return rows


def max_context(
    impl: str,
    start: int = 4096,
    stop: int = 1 << 26,
    dtype: str = "fp32",
    threads: int = 2,
    memory_limit_mib: float = 24 * 1024,
    time_limit_s: float = 900,
    log: Callable[[str], None] = print,
) -> dict:
    """Double the context from `start` until a step fails (memory, time) or `stop` is reached."""
    context, largest, attempts = start, None, []
    while context <= stop:
        log(f"{impl}: training step at T={context:,}")
        result = run_isolated(
            _step_case(impl, context, dtype, threads), timeout=time_limit_s, memory_limit_mib=memory_limit_mib
        )
        attempts.append(result)
        log(_describe(result))
        if "seconds" not in result:
            break
        largest = result
        context *= 2
    return {
        "impl": impl,
        "largest_context": largest["context"] if largest else None,
        "largest_step": largest,
        "stopped_by": attempts[-1].get("error", f"reached --stop {stop:,}") if attempts else None,
        "attempts": attempts,
        "memory_limit_mib": memory_limit_mib,
        "time_limit_s": time_limit_s,
    }


def _describe(row: dict) -> str:
    if "seconds" in row:
        return f"  T={row['context']:,}: {row['seconds']:.1f} s, peak {row['peak_rss_mib']:,.0f} MiB"
    return f"  T={row['context']:,}: {row.get('error')} (peak {row.get('peak_rss_mib', 0):,.0f} MiB)"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| context | cross-attention | step time | peak resident memory | marginal bytes/token |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        step = f"{row['seconds']:.1f} s" if "seconds" in row else row.get("error", "failed")
        marginal = row.get("marginal_bytes_per_token")
        lines.append(
            f"| {row['context']:,} | {row['path']} | {step} | {row.get('peak_rss_mib', 0) / 1024:.2f} GiB | "
            + (f"{marginal:,.0f} |" if marginal is not None else "- |")
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    def series(key: str, scale: float) -> dict:
        out = {}
        for name in ("recomputed", "ordinary"):
            done = [r for r in rows if r["path"] == name and "seconds" in r]
            if done:
                out[f"{name} cross-attention"] = ([r["context"] for r in done], [r[key] / scale for r in done])
        return out

    plot_time_and_memory(series, path, "one training step (s)", "Perceiver AR training step, batch 1")
