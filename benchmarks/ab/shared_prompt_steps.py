"""Tokens/s of a batch sampled from one prompt, as `perceiver generate -n 16 -b 16` runs it (`--dtype auto` and
`fp32`): the shipped checkpoints and the bench model (random weights), temperature 1, after the prompt's prefill;
cached steps alone and with the refills (BENCHMARKS.md "Stop 37"). Run it in two trees for an A/B.

    python benchmarks/ab/shared_prompt_steps.py [BATCH]
"""

import sys
import time

import torch

from perceiver_cli import runner
from perceiver_cli.bench.core import bench_config
from perceiver_cli.device import keep_freed_memory
from perceiver_cli.generate import (
    SamplingOptions,
    auto_decode_dtypes,
    generate_stream,
    step_model,
    step_weights_dtype,
)
from perceiver_cli.model import PerceiverAR


def rates(model, prompt, new_tokens, stepper, paths) -> tuple[float, float]:
    batch = prompt.shape[0]
    generator = torch.Generator().manual_seed(0)
    stream = generate_stream(
        model, prompt, new_tokens, SamplingOptions(), generator=generator, stepper=stepper, **paths
    )
    cached, total, start = [], 0.0, time.perf_counter()
    for index, step in enumerate(stream):
        seconds = time.perf_counter() - start
        if index:
            total += seconds
            if not step.window.refill:
                cached.append(seconds)
        start = time.perf_counter()
    return batch * len(cached) / sum(cached), batch * (new_tokens - 1) / total


def main(batch: int = 16) -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    bench = PerceiverAR(bench_config(16384)).eval()
    cases = [
        ("bench model fp32", bench, 4096, 512, step_model(bench, torch.float32, batch), {}),
        ("bench model auto", bench, 4096, 512, step_model(bench, step_weights_dtype(cpu, batch, torch.float32), batch),
         auto_decode_dtypes(cpu)),
    ]  # fmt: skip
    for name, modality, length, new in (("text-v1", "text", 3000, 1000), ("music-v1", "music", 2000, 918),
                                        ("image-v1", "image", 1537, 1536)):  # fmt: skip
        loaded = runner.load(name, modality)
        cases.append((f"{name} auto", loaded.model, length, new, loaded.stepper(batch), loaded.decode_dtypes))
    for name, model, length, new, stepper, paths in cases:
        prompt = torch.randint(1, 250, (1, length), generator=torch.Generator().manual_seed(1)).repeat(batch, 1)
        steps, overall = rates(model, prompt, new, stepper, paths)
        print(f"{name:17} batch {batch}, prompt {length}, {new} new: cached steps {steps:7.1f} tokens/s, "
              f"with refills {overall:7.1f}")  # fmt: skip


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
