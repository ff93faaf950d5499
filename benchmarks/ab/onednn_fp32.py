"""fp32 inference products through oneDNN on prepacked weights, the GELU and the residual add inside (on), or
F.linear with them as separate ops (off, as before stop 38), alternated call by call in one process (so that the
VM's slow and fast phases fall on both): the bench model's 16k prefill projecting every position (the issue's
count, `perceiver bench --efficiency`'s prefill_fp32 row) and from the projected vocabulary (as generation runs),
and a shipped checkpoint's fp32 forward over a full window (as `perceiver eval --dtype fp32` runs). Best and
median of each side (BENCHMARKS.md "Stop 38").

    python benchmarks/ab/onednn_fp32.py [ROUNDS]
"""

import statistics
import sys
import time

import torch

from perceiver_cli import cpu_linear
from perceiver_cli.bench.core import VOCAB, bench_config
from perceiver_cli.checkpoint import load_checkpoint
from perceiver_cli.device import keep_freed_memory
from perceiver_cli.model import PerceiverAR

ON = cpu_linear.supports_fp32


def toggled(label: str, model: PerceiverAR, tokens: torch.Tensor, rounds: int) -> None:
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    for round_ in range(rounds + 1):
        for on in (True, False) if round_ % 2 else (False, True):
            cpu_linear.supports_fp32 = ON if on else (lambda *_: False)
            start = time.perf_counter()
            with torch.no_grad():
                outputs[on] = model(tokens)
            if round_:  # the first round warms both
                times[on].append(time.perf_counter() - start)
    cpu_linear.supports_fp32 = ON
    difference = (outputs[True] - outputs[False]).abs().max().item()
    line = [f"{label}:"]
    for on in (False, True):
        line.append(
            f"{'on' if on else 'off'} best {min(times[on]) * 1e3:.1f} median {statistics.median(times[on]) * 1e3:.1f} ms"
        )
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(" | ".join(line) + f" | off/on {ratio:.3f} | max |logit difference| {difference:.2e}", flush=True)


def main(rounds: int = 10) -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = PerceiverAR(bench_config(16384)).eval()
    tokens = torch.randint(0, VOCAB, (1, 16384))
    model.project_vocabulary = False
    toggled("bench 16k prefill, every position projected", model, tokens, rounds)
    model.project_vocabulary = True
    toggled("bench 16k prefill, projected vocabulary", model, tokens, rounds)
    for name in ("text-v1", "music-v1"):
        shipped = load_checkpoint(name).model
        window = torch.randint(0, shipped.config.vocab_size, (1, shipped.config.max_context))
        toggled(f"{name} fp32 forward over {shipped.config.max_context} tokens", shipped, window, rounds)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
