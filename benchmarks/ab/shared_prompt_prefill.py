"""The prompt's prefill (the first token's time) for a batch of one prompt, as `perceiver generate -n N -b B`
samples: the bench model (random weights) after a 4,096-token prompt and the shipped checkpoints as their
`--dtype auto` runs them; the best of 3 per row. Run it in two trees for an A/B (BENCHMARKS.md "Stop 37"):

    python benchmarks/ab/shared_prompt_prefill.py
"""

import time

import torch

from perceiver_cli import runner
from perceiver_cli.bench.core import bench_config
from perceiver_cli.device import keep_freed_memory
from perceiver_cli.generate import SamplingOptions, generate_stream, step_model
from perceiver_cli.model import PerceiverAR


def first_token_seconds(model, prompt, stepper, paths) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        next(iter(generate_stream(model, prompt, 2, SamplingOptions(), stepper=stepper, **paths)))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    bench = PerceiverAR(bench_config(16384)).eval()
    cases = [("bench model fp32", bench, 4096, lambda batch: step_model(bench, torch.float32, batch), {})]
    for name, modality, length in (
        ("image-v1", "image", 1537),
        ("music-v1", "music", 4096),
        ("text-v1", "text", 4096),
    ):
        loaded = runner.load(name, modality)
        cases.append((f"{name} auto", loaded.model, length, loaded.stepper, loaded.decode_dtypes))
    for name, model, length, stepper, paths in cases:
        one = torch.randint(1, 200, (1, length), generator=torch.Generator().manual_seed(0))
        times = [first_token_seconds(model, one.repeat(b, 1), stepper(b), paths) for b in (1, 8, 16)]
        print(
            f"{name:18} prompt {length}: first token at batch 1 / 8 / 16: "
            + " / ".join(f"{t:.3f}" for t in times)
            + " s"
        )


if __name__ == "__main__":
    main()
