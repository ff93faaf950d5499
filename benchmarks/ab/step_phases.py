"""Where a fused C step's time goes, phase by phase: a copy of a cpu_decode.c in which thread 0 reads the clock at
every barrier (the phases are separated by barriers, so each interval is one phase, its wait for the slower
thread included), run on the bench config after a prompt, greedy, 55 cached steps timed after 5
(BENCHMARKS.md "Stop 29"). Per step: the products (query/key/value with their LayerNorms, output projection, MLP
up with GELU and down, the head) and the attention, then each of them for the cross-attention block and the
latent layers.

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab/step_phases.py [SOURCE.c] [--prompt 4096] [--batch 16 1]
        [--weights fp32|bf16|int8] [--caches fp32|bf16|int8] [--no-amx]
"""

import argparse
import ctypes
import shutil
import tempfile
from pathlib import Path

import torch

from perceiver_cli import cpu_decode, cpu_kernels
from perceiver_cli.bench.core import VOCAB, bench_config
from perceiver_cli.generate import SamplingOptions, generate_stream, step_model
from perceiver_cli.model import PerceiverAR

BARRIER = """static void barrier(Step *s) {
    (void)s;
#pragma omp barrier
}"""
TIMED_BARRIER = """double phase_seconds[128], phase_mark;
int phase_index;
long timed_steps;
static void barrier(Step *s) {
    (void)s;
#pragma omp barrier
    if (omp_get_thread_num() == 0) {
        double now = omp_get_wtime();
        phase_seconds[phase_index++] += now - phase_mark;
        phase_mark = now;
    }
}"""
STEP = """#pragma omp parallel num_threads(s.threads)
    {
#pragma omp single
        s.threads = omp_get_num_threads();
        run_step(&s, omp_get_thread_num());
    }
    return 0;"""
TIMED_STEP = """phase_index = 0, phase_mark = omp_get_wtime();
#pragma omp parallel num_threads(s.threads)
    {
#pragma omp single
        s.threads = omp_get_num_threads();
        run_step(&s, omp_get_thread_num());
    }
    phase_seconds[127] += omp_get_wtime() - phase_mark; /* the head */
    timed_steps++;
    return 0;"""
PHASES = ("query/key/value", "attention", "output", "MLP up", "MLP down")  # per block, after the embedding


def timed_copy(source: Path, folder: Path) -> Path:
    text = source.read_text()
    if BARRIER not in text or STEP not in text:
        raise SystemExit(f"{source}: its barrier or its parallel region is not the one this script patches")
    target = folder / source.name
    target.write_text(text.replace(BARRIER, TIMED_BARRIER).replace(STEP, TIMED_STEP))
    for header in source.parent.glob("*.h"):
        shutil.copy(header, folder)
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", nargs="?", default=str(cpu_decode.SOURCE))
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--weights", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--caches", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--no-amx", action="store_true", help="bf16 batch products on vdpbf16ps, not AMX tiles")
    args = parser.parse_args()
    cpu_decode.amx_products = not args.no_amx
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = PerceiverAR(bench_config(16384)).eval()
    layers = model.config.num_layers
    with tempfile.TemporaryDirectory() as folder:
        cpu_decode.SOURCE = timed_copy(Path(args.source), Path(folder))  # what FusedStep's kernel is built from
        assert cpu_decode.available(), "the timed copy did not build"
        library = ctypes.CDLL(str(cpu_kernels.build(cpu_decode.SOURCE)))  # the same library, for its counters
    seconds = (ctypes.c_double * 128).in_dll(library, "phase_seconds")
    steps = ctypes.c_long.in_dll(library, "timed_steps")
    for batch in args.batch:
        prompt = torch.randint(0, VOCAB, (batch, args.prompt))
        stream = generate_stream(
            model, prompt, 60, SamplingOptions(0), stepper=step_model(model, dtypes[args.weights], batch),
            cache_dtype=dtypes[args.caches],
        )  # fmt: skip
        for index, _ in enumerate(stream):
            if index == 4:  # the prompt's pass and the first steps are not timed
                ctypes.memset(seconds, 0, ctypes.sizeof(seconds))
                steps.value = 0
        t, n = list(seconds), steps.value

        def ms(value: float, n: int = n) -> str:
            return f"{1e3 * value / n:.2f}"

        blocks = [[t[1 + 5 * block + j] for j in range(5)] for block in range(layers + 1)]
        products = sum(sum(b) - b[1] for b in blocks) + t[127]
        attention = sum(b[1] for b in blocks)
        latent = [sum(b[j] for b in blocks[1:]) for j in range(5)]
        print(
            f"batch {batch}, prompt {args.prompt}, {n} steps: {ms(sum(t))} ms a step = products {ms(products)}"
            f" + attention {ms(attention)} ms | cross-attention block: "
            + ", ".join(f"{p} {ms(v)}" for p, v in zip(PHASES, blocks[0], strict=True))
            + " | latent layers: "
            + ", ".join(f"{p} {ms(v)}" for p, v in zip(PHASES, latent, strict=True))
            + f", head {ms(t[127])}",
            flush=True,
        )


if __name__ == "__main__":
    main()
