"""The bf16 prefill at 16k of this tree against another checkout's, in alternated child processes (each the best
of 7 prefills after a warm-up, freed memory kept, huge pages on), ROUNDS rounds; prints each tree's minimum and
median and in how many rounds this tree was faster (BENCHMARKS.md "Stop 34": the VM drifts by several percent
within minutes, so a change is judged by many alternated rounds, not one pair).

    git worktree add /tmp/before COMMIT
    python benchmarks/ab/prefill_against_tree.py /tmp/before [ROUNDS] [fp32]
"""

import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, torch
from perceiver_cli.device import autocast, keep_freed_memory
keep_freed_memory()
from perceiver_cli.bench.core import VOCAB, bench_config, best_time
from perceiver_cli.model import PerceiverAR
torch.set_num_threads(2)
torch.manual_seed(0)
model = PerceiverAR(bench_config(16384)).eval()
tokens = torch.randint(0, VOCAB, (1, 16384))
dtype = torch.float32 if sys.argv[1] == "fp32" else torch.bfloat16
def prefill():
    with torch.no_grad(), autocast(torch.device("cpu"), dtype):
        model(tokens)
print(best_time(prefill, 7))
"""

if __name__ == "__main__":
    other, here = Path(sys.argv[1]).resolve(), Path(__file__).resolve().parent.parent.parent
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    dtype = sys.argv[3] if len(sys.argv) > 3 else "bf16"
    seconds: dict = {other: [], here: []}
    for _ in range(rounds):
        for tree in seconds:
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1", "PYTHONPATH": str(tree)}
            run = subprocess.run(
                [sys.executable, "-c", CHILD, dtype], env=env, cwd=tree, capture_output=True, text=True
            )
            seconds[tree].append(float(run.stdout.strip()))
    for tree, values in seconds.items():
        listed = " ".join(f"{v:.4f}" for v in values)
        print(f"{tree}: min {min(values):.4f} s, median {statistics.median(values):.4f} s ({listed})")
    faster = sum(mine < theirs for mine, theirs in zip(seconds[here], seconds[other], strict=True))
    print(f"{here} faster in {faster} of {rounds} rounds")
