"""`perceiver report`: the numbers a model card needs, measured in one run and written as JSON + markdown + plots.

For a checkpoint and one or more prepared evaluation sets it measures: held-out bits in fp32 and bf16 (the
quality cost of bf16), the classic baselines on exactly the same documents (baselines.py), and the eval-time
compute trade-off of Perceiver AR: bits and cached decode tokens/s at several latent counts, the latter both on
the exact fp32 path and as `perceiver generate` decodes on a CPU by default (`auto`: the step weights
`step_weights_dtype` picks and bf16 key/value caches, through the fused C step where it is available).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..codecs.base import atomic_write
from ..device import cpu_has_fast_bf16
from ..generate import auto_decode_dtypes, generate, step_model, step_weights_dtype
from .baselines import baseline_table
from .evaluate import evaluate_documents
from .prepare import PreparedData

PRIMARY_UNIT = {"music": "event", "image": "dim", "text": "byte"}


def _documents(data: PreparedData, max_documents: int | None, max_document_tokens: int | None) -> list[np.ndarray]:
    documents = [np.asarray(d, dtype=np.int64) for d in data.documents("val")][:max_documents]
    if max_document_tokens:
        documents = [d[:max_document_tokens] for d in documents]
    return [d for d in documents if len(d) >= 2]


def decode_speed(model, prompt: torch.Tensor, new_tokens: int, num_latents: int | None, dtype, **paths) -> float:
    """Tokens/s of sampling `new_tokens` after `prompt` (prefill and refills included); `paths`: generate()'s
    stepper, cache_dtype and refill_dtype."""
    from ..device import autocast

    generate(model, prompt[:, :8], 4, temperature=0, num_latents=num_latents, **paths)  # warm-up
    start = time.perf_counter()
    with autocast(torch.device("cpu"), dtype):
        generate(
            model,
            prompt,
            new_tokens,
            temperature=1.0,
            num_latents=num_latents,
            generator=torch.Generator().manual_seed(0),
            **paths,
        )
    return new_tokens / (time.perf_counter() - start)


def decode_speeds(model, prompt: torch.Tensor, new_tokens: int, latents: list[int]) -> list[dict]:
    """Per latent count, cached decode tokens/s at batch 1 on the CPU: the exact fp32 path ("decode_tokens_per_s")
    and `perceiver generate`'s default ("decode_tokens_per_s_generate": runner.Loaded.stepper, auto_decode_dtypes)."""
    cpu = torch.device("cpu")
    paths = dict(stepper=step_model(model, step_weights_dtype(cpu, 1, torch.float32), 1), **auto_decode_dtypes(cpu))
    return [
        {
            "decode_tokens_per_s": decode_speed(model, prompt, new_tokens, n, torch.float32),
            "decode_tokens_per_s_generate": decode_speed(model, prompt, new_tokens, n, torch.float32, **paths),
        }
        for n in latents
    ]


def decode_prompt(model, documents: list[np.ndarray]) -> torch.Tensor:
    """The decode prompt of a report: the longest document's first max_context / 2 tokens, (1, T)."""
    source = max(documents, key=len)
    return torch.as_tensor(source[: min(len(source), model.config.max_context // 2)])[None]


def refresh_decode_speeds(report: dict, checkpoint: str | Path, new_tokens: int = 256) -> dict:
    """The report with its latents rows' decode speeds measured again (both paths) on this machine, from the
    same prompt; the bits stay as measured. For reports written before the generate column existed."""
    model = load_checkpoint(checkpoint).model.eval()
    first = next(iter(report["sets"].values()))
    documents = _documents(
        PreparedData(Path(first["directory"])), report["max_documents"], report["max_document_tokens"]
    )
    prompt = decode_prompt(model, documents)
    rows = report["latents"]
    for row, speeds in zip(
        rows, decode_speeds(model, prompt, new_tokens, [r["latents"] for r in rows]), strict=True
    ):
        row.update(speeds, prompt_tokens=prompt.shape[1])
    report["decode_refreshed"] = time.strftime("%Y-%m-%d")
    return report


def make_report(
    checkpoint: str | Path,
    eval_sets: dict[str, Path],
    train_dir: Path,
    *,
    max_documents: int | None = 16,
    max_document_tokens: int | None = 8192,
    latents: list[int] | None = None,
    decode_tokens: int = 256,
    contexts: list[int] | None = None,
    bf16: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """bf16=None measures the bf16 quality cost only where bf16 is fast (CPUs without AVX512-BF16/AMX run it
    ~100x slower than fp32, so there it would take hours)."""
    if bf16 is None:
        bf16 = cpu_has_fast_bf16()
    loaded = load_checkpoint(checkpoint)
    model, codec = loaded.model, loaded.codec
    unit = PRIMARY_UNIT[codec.name]
    train_data = PreparedData(train_dir)
    report: dict = {
        "checkpoint": str(loaded.path),
        "unit": unit,
        "max_documents": max_documents,
        "max_document_tokens": max_document_tokens,
        "sets": {},
    }
    for index, (name, directory) in enumerate(eval_sets.items()):
        data = PreparedData(directory)
        documents = _documents(data, max_documents, max_document_tokens)
        log(f"{name}: {len(documents)} documents, {sum(len(d) for d in documents):,} tokens")
        entry = {"directory": str(directory), "documents": len(documents)}
        start = time.perf_counter()
        entry["fp32"] = evaluate_documents(model, codec, documents).summary()
        entry["eval_seconds"] = time.perf_counter() - start
        log(f"  fp32 {entry['fp32']}")
        if index == 0 and bf16:
            entry["bf16"] = evaluate_documents(model, codec, documents, dtype=torch.bfloat16).summary()
            log(f"  bf16 bits/{unit} {entry['bf16'][f'bits_per_{unit}']:.4f}")
        entry["baselines"] = baseline_table(
            data,
            max_documents=max_documents,
            max_document_tokens=max_document_tokens,
            train_data=train_data,
            max_train_tokens=5_000_000,
        )
        for baseline, values in entry["baselines"].items():
            log(f"  {baseline}: {values['per_unit']}")
        best = min(entry["baselines"].items(), key=lambda item: item[1]["per_unit"][unit])
        entry["best_baseline"] = {"name": best[0], f"bits_per_{unit}": best[1]["per_unit"][unit]}
        entry["ratio_to_best_baseline"] = entry["fp32"][f"bits_per_{unit}"] / best[1]["per_unit"][unit]
        report["sets"][name] = entry

    first = next(iter(eval_sets.values()))
    documents = _documents(PreparedData(first), max_documents, max_document_tokens)
    n_default = model.config.num_latents
    sweep = sorted({n for n in (latents or [64, 128, 256, n_default]) if n <= model.config.max_context})
    prompt = decode_prompt(model, documents)
    report["latents"] = []
    for n, speeds in zip(sweep, decode_speeds(model, prompt, decode_tokens, sweep), strict=True):
        bits = evaluate_documents(model, codec, documents[: max(1, len(documents) // 2)], num_latents=n).summary()
        report["latents"].append(
            {
                "latents": n,
                f"bits_per_{unit}": bits[f"bits_per_{unit}"],
                "bits_per_token": bits["bits_per_token"],
                **speeds,
                "prompt_tokens": prompt.shape[1],
            }
        )
        log(
            f"  latents {n}: bits/{unit} {bits[f'bits_per_{unit}']:.4f}, decode {speeds['decode_tokens_per_s']:.1f} "
            f"tok/s exact, {speeds['decode_tokens_per_s_generate']:.1f} as generate runs it"
        )
    if contexts:
        report["contexts"] = context_effect(model, codec, documents, contexts, log)
    return report


def context_effect(model, codec, documents, contexts: list[int], log, latents: int = 128) -> list[dict]:
    """The long-context effect: bits on the later part of long documents (positions >= max(contexts)) when the
    model may see only the last C tokens, for each C. Same documents, same scored positions, same latents."""
    from .evaluate import UNITS, score_document

    later = max(contexts)
    long_documents = [d for d in documents if len(d) > later + 256]
    rows = []
    for context in sorted(contexts):
        bits, units = 0.0, {}
        for document in long_documents:
            scored = score_document(model, document, num_latents=min(latents, context), max_context=context)
            bits += float(scored[later - 1 :].sum())  # targets at positions >= `later`
            for unit, count in UNITS[codec.name](codec, document[later:]).items():
                units[unit] = units.get(unit, 0.0) + count
        unit = PRIMARY_UNIT[codec.name]
        rows.append(
            {
                "context": context,
                "documents": len(long_documents),
                "from_position": later,
                f"bits_per_{unit}": bits / units[unit] if units.get(unit) else None,
            }
        )
        log(f"  context {context}: bits/{unit} {rows[-1][f'bits_per_{unit}']}")
    return rows


def write_report(report: dict, out_dir: Path) -> None:
    from ..render import plot_xy

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
    unit = report["unit"]
    rows = report["latents"]
    plot_xy(
        {"bits": ([r["latents"] for r in rows], [r[f"bits_per_{unit}"] for r in rows])},
        out_dir / "latents_bits.png",
        xlabel="latents N at inference",
        ylabel=f"held-out bits/{unit}",
        title="quality vs eval-time compute",
        logx=True,
    )
    speeds = {"exact fp32 path": ([r["latents"] for r in rows], [r["decode_tokens_per_s"] for r in rows])}
    if all("decode_tokens_per_s_generate" in r for r in rows):
        speeds["perceiver generate (auto)"] = (
            [r["latents"] for r in rows],
            [r["decode_tokens_per_s_generate"] for r in rows],
        )
    plot_xy(
        speeds,
        out_dir / "latents_speed.png",
        xlabel="latents N at inference",
        ylabel="cached decode tokens/s (batch 1)",
        title="speed vs eval-time compute",
        logx=True,
    )
    if report.get("contexts"):
        rows = report["contexts"]
        plot_xy(
            {"bits": ([r["context"] for r in rows], [r[f"bits_per_{unit}"] for r in rows])},
            out_dir / "context_bits.png",
            xlabel="context tokens the model may see",
            logx=True,
            ylabel=f"bits/{unit} on positions >= {rows[0]['from_position']}",
            title="the long-context effect",
        )
    atomic_write(out_dir / "report.md", lambda tmp: tmp.write_text(report_markdown(report)))


def report_markdown(report: dict) -> str:
    unit = report["unit"]
    lines = []
    for name, entry in report["sets"].items():
        model = entry["fp32"]
        lines += [
            f"**{name}** ({entry['documents']} documents, first {report['max_document_tokens']} tokens each)",
            "",
            f"| model | bits/{unit} | " + ("bits/second |" if unit == "event" else ""),
            "|---|---:|" + ("---:|" if unit == "event" else ""),
        ]
        extra = f" {model['bits_per_second']:.1f} |" if unit == "event" else ""
        lines.append(f"| Perceiver AR (fp32) | **{model[f'bits_per_{unit}']:.3f}** |{extra}")
        if "bf16" in entry:
            extra = f" {entry['bf16']['bits_per_second']:.1f} |" if unit == "event" else ""
            lines.append(f"| Perceiver AR (bf16 autocast) | {entry['bf16'][f'bits_per_{unit}']:.3f} |{extra}")
        for baseline, values in sorted(entry["baselines"].items(), key=lambda item: item[1]["per_unit"][unit]):
            extra = f" {values['per_unit']['second']:.1f} |" if unit == "event" else ""
            lines.append(f"| {baseline} | {values['per_unit'][unit]:.3f} |{extra}")
        lines += [
            "",
            f"Ratio to the best baseline ({entry['best_baseline']['name']}): "
            f"**{entry['ratio_to_best_baseline']:.3f}**",
            "",
        ]
    first = next(iter(report["sets"].values()))
    lines += [
        f"Eval-time compute (first set, its first {max(1, first['documents'] // 2)} documents; decode after a "
        f"{report['latents'][0]['prompt_tokens']:,}-token prompt):",
        "",
    ]
    if all("decode_tokens_per_s_generate" in r for r in report["latents"]):
        lines += [
            f"| latents N | bits/{unit} | decode tokens/s, `perceiver generate` (auto, batch 1) | exact fp32 path |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['latents']} | {r[f'bits_per_{unit}']:.3f} | {r['decode_tokens_per_s_generate']:.1f} | "
            f"{r['decode_tokens_per_s']:.1f} |"
            for r in report["latents"]
        ]
    else:  # a report from before the generate column
        lines += [f"| latents N | bits/{unit} | cached decode tokens/s (fp32, batch 1) |", "|---:|---:|---:|"]
        lines += [
            f"| {r['latents']} | {r[f'bits_per_{unit}']:.3f} | {r['decode_tokens_per_s']:.1f} |"
            for r in report["latents"]
        ]
    if report.get("contexts"):
        rows = report["contexts"]
        lines += [
            "",
            f"Long-context effect ({rows[0]['documents']} documents; only targets at positions >= "
            f"{rows[0]['from_position']:,} are scored, each seeing at most the last C tokens; 128 latents):",
            "",
            f"| context C | bits/{unit} |",
            "|---:|---:|",
        ]
        lines += [f"| {r['context']:,} | {r[f'bits_per_{unit}']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"
