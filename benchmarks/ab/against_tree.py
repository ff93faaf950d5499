"""This tree's code against another checkout's (an earlier commit's), in alternated child processes: prefill
(fp32, bf16) and training steps (bf16, fp32) at 16k tokens of the bench config, the child of
keep_freed_memory.py with freed memory kept and huge pages on, as the command line runs. Each child imports
perceiver_cli from the tree it is given (PYTHONPATH comes before the editable install) and says which.

    git worktree add /tmp/before COMMIT
    python benchmarks/ab/against_tree.py /tmp/before [ROUNDS]
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = HERE / "keep_freed_memory.py"
SHOW_TREE = "import perceiver_cli, pathlib; print(pathlib.Path(perceiver_cli.__file__).parent.parent, end=': ')"

if __name__ == "__main__":
    other = Path(sys.argv[1]).resolve()
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for _ in range(rounds):
        for tree in (other, HERE.parent.parent):
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1", "PYTHONPATH": str(tree)}
            subprocess.run([sys.executable, "-c", SHOW_TREE], env=env, check=True, cwd=tree)
            sys.stdout.flush()
            subprocess.run([sys.executable, str(CHILD), "keep"], env=env, check=True, cwd=tree)
