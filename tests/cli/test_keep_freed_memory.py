"""The command line makes glibc keep freed memory for reuse (cli/__init__.py, device.keep_freed_memory)."""

import os
import platform
import subprocess
import sys

import pytest

# page faults of ten 64 MiB tensors allocated and freed one after another, after two warm-up tensors (glibc
# settles where the block lives on the second)
ALLOCATE = """
import resource, perceiver_cli.cli.main, torch
from perceiver_cli.device import kept_freed_memory
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    x = torch.ones(16 * 2**20); del x
before = faults()
for _ in range(10):
    x = torch.ones(16 * 2**20); del x
print(kept_freed_memory(), faults() - before)
"""


def run(**env) -> tuple[bool, int]:
    environment = {k: v for k, v in os.environ.items() if k != "PERCEIVER_KEEP_FREED_MEMORY"}
    environment |= {"THP_MEM_ALLOC_ENABLE": "0", **env}  # 4 KiB pages: one fault per page touched
    done = subprocess.run([sys.executable, "-c", ALLOCATE], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    kept, faults = done.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)
def test_freed_tensors_are_reused_without_new_page_faults_unless_turned_off():
    kept, faults = run()
    # the heap's pages are reused (glibc sometimes moves the block once more: at most two tensors' pages)
    assert kept and faults <= 2 * 16_384
    kept, faults = run(PERCEIVER_KEEP_FREED_MEMORY="0")
    assert not kept and faults >= 10 * 16_000  # each 64 MiB tensor is a fresh mmap: 16,384 pages each
