"""The cross-attention's keys and values from the projected vocabulary (PerceiverAR.project_vocabulary, the
default) against every input position projected, alternated in one process on the bench model at 16k: the best
of 7 prefills and of 3 training steps per round, fp32 and bf16 autocast, and the largest logit difference
(BENCHMARKS.md "Stop 35").

    python benchmarks/ab/projected_vocabulary.py [ROUNDS]
"""

import statistics
import sys

import torch

from perceiver_cli.bench.core import VOCAB, bench_config, best_time
from perceiver_cli.device import autocast, keep_freed_memory
from perceiver_cli.model import PerceiverAR, latent_loss


def main(rounds: int = 6) -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = PerceiverAR(bench_config(16384))
    tokens = torch.randint(0, VOCAB, (1, 16385))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cpu = torch.device("cpu")
    times: dict = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits = {}

        def prefill(dtype=dtype):
            with torch.no_grad(), autocast(cpu, dtype):
                return model(tokens[:, :-1])

        def step(dtype=dtype):
            with autocast(cpu, dtype):
                loss = latent_loss(model(tokens[:, :-1]), tokens[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        model.eval()
        for projected in (False, True):  # with the same weights: the training steps below change them
            model.project_vocabulary = projected
            logits[projected] = prefill().float()
        for _ in range(rounds):
            for projected in (False, True):
                model.project_vocabulary = projected
                model.eval()
                times.setdefault(("prefill", dtype, projected), []).append(best_time(prefill, 7))
                model.train()
                times.setdefault(("train", dtype, projected), []).append(best_time(step, 3))
        difference = (logits[True] - logits[False]).abs().max().item()
        print(f"{str(dtype).removeprefix('torch.')}: largest logit difference {difference:.3g}")
    print(
        f"\n| 16k, bench model | every position | projected vocabulary | faster in | ({rounds} rounds, medians) |"
    )
    print("|---|---:|---:|---:|---|")
    for kind in ("prefill", "train"):
        for dtype in (torch.float32, torch.bfloat16):
            before, after = times[kind, dtype, False], times[kind, dtype, True]
            wins = sum(a < b for a, b in zip(after, before, strict=True))
            name = f"{kind} {str(dtype).removeprefix('torch.')}"
            print(
                f"| {name} | {statistics.median(before):.4f} s | {statistics.median(after):.4f} s "
                f"| {wins} of {rounds} | {min(before):.4f} / {min(after):.4f} s best |"
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
