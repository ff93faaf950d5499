"""One training step of the bench config at 131,072 and 524,288 tokens (the recomputed cross-attention), with and
without glibc keeping freed memory (device.keep_freed_memory, which the command line and, from stop 33, the
`perceiver bench` children turn on), each in its own process: seconds and peak resident memory
(BENCHMARKS.md "Very long contexts").

    python benchmarks/ab/long_context_keep.py
"""

import json
import os
import subprocess
import sys

CHILD = """
import json, sys
if sys.argv[1] == "1":
    from perceiver_cli.device import keep_freed_memory
    keep_freed_memory()
from perceiver_cli.bench.core import run_case
case = {"kind": "train", "impl": "perceiver", "context": int(sys.argv[2]), "threads": 2, "repeats": 0}
result = run_case(case)
print(json.dumps({key: result[key] for key in ("seconds", "peak_rss_mib")}))
"""

if __name__ == "__main__":
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1", "OMP_NUM_THREADS": "2"}
    for context in (131072, 524288):
        for keep in ("0", "1"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, keep, str(context)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{context:9,d} tokens, freed memory kept={keep}: {result['seconds']:.1f} s, {result['peak_rss_mib']:,.0f} MiB"
            )
