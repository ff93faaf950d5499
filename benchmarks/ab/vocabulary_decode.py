"""Cached decoding's cross-attention from the projected vocabulary (cpu_decode.vocabulary_attention, the default)
against reading the cross-attention caches, alternated in one process: the bench model after a 4,096-token
prompt, one refill cycle per measurement (as `perceiver bench --efficiency` times it), the fused C step with
fp32 weights and caches and as `--dtype auto` runs it (BENCHMARKS.md "Stop 36").

    python benchmarks/ab/vocabulary_decode.py [ROUNDS]
"""

import statistics
import sys

import torch

from perceiver_cli import cpu_decode
from perceiver_cli.bench.core import bench_config
from perceiver_cli.bench.efficiency import decode_cycle, streaming_bandwidth
from perceiver_cli.device import keep_freed_memory
from perceiver_cli.generate import auto_decode_dtypes, step_weights_dtype
from perceiver_cli.model import PerceiverAR


def main(rounds: int = 3) -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = PerceiverAR(bench_config(16384)).eval()
    cpu = torch.device("cpu")
    bandwidth = streaming_bandwidth(model.num_parameters())
    rates: dict = {}
    for _ in range(rounds):
        for batch in (1, 16):
            auto = step_weights_dtype(cpu, batch, torch.float32)
            for label, step_dtype, paths in (("fp32", torch.float32, {}), ("auto", auto, auto_decode_dtypes(cpu))):
                for vocabulary in (False, True):
                    cpu_decode.vocabulary_attention = vocabulary
                    result = decode_cycle(model, batch, step_dtype, bandwidth, fused=True, **paths)
                    rates.setdefault((batch, label, vocabulary), []).append(result)
                    print(batch, label, vocabulary, f"{result['tokens_per_s']:.1f} tokens/s", flush=True)
    print(
        f"\n| bench model, after 4,096 | caches | vocabulary | faster in | ({rounds} rounds, medians, tokens/s) |"
    )
    print("|---|---:|---:|---:|---|")
    for batch in (1, 16):
        for label in ("fp32", "auto"):
            before = [r["tokens_per_s"] for r in rates[batch, label, False]]
            after = [r["tokens_per_s"] for r in rates[batch, label, True]]
            wins = sum(a > b for a, b in zip(after, before, strict=True))
            ceiling = rates[batch, label, False][0]["ceiling_tokens_per_s"]
            print(
                f"| batch {batch}, {label} | {statistics.median(before):.1f} | {statistics.median(after):.1f} "
                f"| {wins} of {rounds} | ceiling with the caches' bytes {ceiling:.1f} at {bandwidth / 1e9:.1f} GB/s |"
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
