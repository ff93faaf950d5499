"""`perceiver bench --efficiency`: the bench config measured against this machine's own limits, in one run.

Limits: GEMM peak (best 2048x2048 matmul, fp32 and bf16) and weight-streaming bandwidth (one matrix-vector
product over a tensor as large as the model's weights). Then, for the bench config of core.py:
  prefill / training step at 16k: achieved FLOP/s over the GEMM peak, FLOPs counted analytically by
      PerceiverAR.flops_per_token (2 per multiply-add; a training step counts 3x the forward);
  cached decode after a 4,096-token prompt at batch 1 and 16: tokens/s over the streaming ceiling, where each
      step must read every weight once plus, per row, the cross-attention cache and the latent caches.
"""

from __future__ import annotations

import time

import torch

from ..device import autocast
from ..generate import SamplingOptions, generate, generate_stream
from ..model import PerceiverAR, latent_loss
from .core import VOCAB, bench_config, best_time


def gemm_peak(dtype: torch.dtype, size: int = 2048) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / best_time(lambda: a @ b)


def streaming_bandwidth(num_elements: int) -> float:
    """Bytes per second of one fp32 matvec over `num_elements` weights (the decode-time access pattern)."""
    rows = 4096
    weight = torch.randn(rows, num_elements // rows)
    vector = torch.randn(num_elements // rows)
    return weight.numel() * 4 / best_time(lambda: weight @ vector, repeats=10)


def run(context: int = 16384, threads: int = 2, log=print) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = bench_config(context)
    model = PerceiverAR(config)
    parameters = model.num_parameters()
    results: dict = {"parameters": parameters, "context": context}
    peaks = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    bandwidth = streaming_bandwidth(parameters)
    results.update(gemm_peak_gflops={k: v / 1e9 for k, v in peaks.items()}, bandwidth_gb_s=bandwidth / 1e9)
    log(
        f"GEMM peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f}; stream {bandwidth / 1e9:.1f} GB/s"
    )
    tokens = torch.randint(0, VOCAB, (1, context + 1))
    forward_flops = model.flops_per_token(context)["total"]
    device = torch.device("cpu")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model.eval()

        def prefill(dtype=dtype):
            with torch.no_grad(), autocast(device, dtype):
                model(tokens[:, :context])

        seconds = best_time(prefill, repeats=2)
        results[f"prefill_{name}"] = {"seconds": seconds, "fraction_of_peak": forward_flops / seconds / peaks[name]}
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

        def step(dtype=dtype, optimizer=optimizer):
            with autocast(device, dtype):
                logits = model(tokens[:, :context])
            latent_loss(logits, tokens[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = best_time(step, repeats=1)
        results[f"train_{name}"] = {
            "seconds": seconds,
            "fraction_of_peak": 3 * forward_flops / seconds / peaks[name],
        }
        log(f"{name}: prefill {results[f'prefill_{name}']}, train {results[f'train_{name}']}")
    model.eval()
    c = config
    weight_bytes = parameters * 4
    for batch in (1, 16):
        prompt = torch.randint(0, VOCAB, (batch, 4096))
        new = 64
        generate(model, prompt[:, :64], 4, temperature=0)
        stamps = [time.perf_counter() for _ in generate_stream(model, prompt, new, SamplingOptions(temperature=0))]
        elapsed = stamps[-1] - stamps[0]  # the decode steps only: the prompt's prefill is excluded
        # per step: all weights once, and per row the cross cache (~4,096 keys+values) and the latent caches
        cache_bytes = (4096 + new) * 2 * c.d_model * 4 + c.num_layers * c.num_latents * 3 // 4 * 2 * c.d_model * 4
        step_bytes = weight_bytes + batch * cache_bytes
        ceiling = bandwidth / step_bytes * batch  # tokens/s if every step only streamed its bytes
        rate = batch * (new - 1) / elapsed
        results[f"decode_batch{batch}"] = {
            "tokens_per_s": rate,
            "ceiling_tokens_per_s": ceiling,
            "fraction_of_ceiling": rate / ceiling,
            "bytes_per_step": step_bytes,
        }
        log(f"decode batch {batch}: {results[f'decode_batch{batch}']}")
    return results
