"""Two builds of cpu_decode.c on the same cached step, in one process, alternated call by call: the bench config
after a 4,096-token prompt with 768 latents cached (the middle of a refill cycle, which runs 512 -> 1,024), the
step's median time with each build and the median of the per-round ratios. Both builds read the same weights and
caches within the same second, so this VM's bandwidth swings (2x within minutes) fall on both alike; separate
processes compared one after the other could not resolve a 5% change (BENCHMARKS.md "Stop 29").

    git show COMMIT:perceiver_cli/cpu_decode.c > /tmp/before.c; cp perceiver_cli/cpu_simd.h /tmp/
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab/paired_kernels.py /tmp/before.c perceiver_cli/cpu_decode.c [--auto | --int8] [--batch 16 1]

--auto: bf16 step weights and caches, as `--dtype auto` decodes on a CPU with AVX512-BF16 (default: fp32); --int8:
int8 caches and int8 step weights (bf16 from cpu_decode.INT8_MAX_ROWS rows), as `--dtype int8` decodes.
The two builds must share the Model/Block structures FusedStep hands them.
"""

import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

from perceiver_cli import cpu_decode, cpu_kernels
from perceiver_cli.bench.core import VOCAB, bench_config
from perceiver_cli.generate import DecodeState, Window, step_model
from perceiver_cli.model import PerceiverAR

PROMPT, LATENTS, ROUNDS = 4096, 768, 120


def step_function(source: str):
    library = cpu_kernels.load(Path(source), cpu_kernels.AVX512)
    if library is None:
        sys.exit(f"could not build {source}")
    step = library.f32_decode_step
    step.argtypes, step.restype = cpu_decode._kernel()[0].argtypes, ctypes.c_int
    return step


def main() -> None:
    arguments = sys.argv[1:]
    batches = (16, 1)
    if "--batch" in arguments:  # --batch N [N ...], last
        at = arguments.index("--batch")
        batches, arguments = tuple(int(b) for b in arguments[at + 1 :]), arguments[:at]
    sources = [a for a in arguments if not a.startswith("--")]
    auto, int8 = "--auto" in arguments, "--int8" in arguments
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = PerceiverAR(bench_config(16384)).eval()
    steps = [step_function(source) for source in sources]
    for batch in batches:
        if int8:  # as `--dtype int8` decodes (runner.Loaded.stepper): int8 weights for small batches, int8 caches
            dtype = torch.int8 if batch < cpu_decode.INT8_MAX_ROWS else torch.bfloat16
        else:
            dtype = torch.bfloat16 if auto else torch.float32
        state = DecodeState(
            model, batch, PROMPT + 1, torch.device("cpu"), stepper=step_model(model, dtype, batch),
            cache_dtype=torch.int8 if int8 else torch.bfloat16 if auto else None,
        )  # fmt: skip
        with torch.no_grad():
            state.append_inputs(torch.randint(0, VOCAB, (batch, PROMPT)))
            state.latent_pass(Window(0, PROMPT, LATENTS, refill=True))
        fused = state.fused
        assert fused, "the fused C step does not run here"
        times = [[] for _ in steps]
        for round_ in range(ROUNDS):
            order = range(len(steps)) if round_ % 2 == 0 else reversed(range(len(steps)))
            for index in order:
                fused.step = steps[index]
                start = time.perf_counter()
                fused(state.tokens, PROMPT - 1, state.cross_length, LATENTS)
                times[index].append(time.perf_counter() - start)
        medians = [statistics.median(t) for t in times]
        ratios = [statistics.median(b / a for a, b in zip(times[0], t, strict=True)) for t in times[1:]]
        print(
            f"{'int8' if int8 else 'auto' if auto else 'fp32'} batch {batch:2d}: "
            + " | ".join(f"{Path(s).name} {m * 1e3:.2f} ms" for s, m in zip(sources, medians, strict=True))
            + "".join(f" | time ratio {r:.3f}" for r in ratios),
            flush=True,
        )


if __name__ == "__main__":
    main()
