"""Per-token time outside the C step in generate_stream: a shipped checkpoint sampled as `perceiver generate` does
(`--dtype auto`, temperature 1), each cached step's ctypes call timed from Python; the median token interval
minus the median call is what Python costs a token (sampling, bookkeeping, the call's own marshalling). Unlike a
whole `perceiver generate` run, this barely moves with the VM's memory bandwidth (BENCHMARKS.md "Stop 29").

    git worktree add /tmp/ab_before COMMIT
    for i in 1 2 3; do
        PYTHONPATH=/tmp/ab_before python benchmarks/ab/step_overhead.py before
        PYTHONPATH=$PWD python benchmarks/ab/step_overhead.py after
    done

--dtype=int8 (or fp32) samples as `perceiver generate --dtype int8` does instead.
"""

import statistics
import sys
import time

import torch

from perceiver_cli import cpu_decode
from perceiver_cli.generate import SamplingOptions, generate_stream
from perceiver_cli.runner import load

TOKENS = 1000


def timed(function, durations: list[float]):
    """`function`, appending the seconds of each call to `durations`."""

    def call(*args):
        start = time.perf_counter()
        result = function(*args)
        durations.append(time.perf_counter() - start)
        return result

    return call


def main() -> None:
    torch.set_num_threads(2)
    calls: list[float] = []
    original = cpu_decode.FusedStep.__init__

    def timed_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.step = timed(self.step, calls)

    cpu_decode.FusedStep.__init__ = timed_init
    arguments = [a for a in sys.argv[1:] if not a.startswith("--dtype=")]
    dtype = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--dtype=")), "auto")
    line = [arguments[0] if arguments else ""]
    for name in ("music-v1", "text-v1"):
        loaded = load(name, name.split("-")[0], dtype=dtype)
        generator = torch.Generator().manual_seed(1)
        prompt = torch.zeros(1, 1, dtype=torch.long)
        calls.clear()
        intervals, start = [], time.perf_counter()
        stream = generate_stream(
            loaded.model, prompt, TOKENS, SamplingOptions(), generator=generator, stepper=loaded.stepper(1),
            **loaded.decode_dtypes,
        )  # fmt: skip
        for step in stream:
            now = time.perf_counter()
            if not step.window.refill:
                intervals.append(now - start)
            start = now
        interval, call = statistics.median(intervals), statistics.median(calls)
        line.append(
            f"{name}: token {interval * 1e6:.0f} us, C call {call * 1e6:.0f} us, outside {(interval - call) * 1e6:.0f} us"
        )
    print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
