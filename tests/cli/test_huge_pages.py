"""The command line turns on transparent huge pages for PyTorch's large CPU tensors (cli/__init__.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ALLOCATE = """
import perceiver_cli.cli.main, torch
x = torch.randn(16 * 2**20); y = x + 1  # two 64 MiB tensors
print(next(int(line.split()[1]) for line in open('/proc/self/smaps_rollup') if line.startswith('AnonHugePages')))
"""


def huge_kib(**env) -> int:
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    done = subprocess.run([sys.executable, "-c", ALLOCATE], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text() or not Path("/proc/self/smaps_rollup").exists(),
    reason="no transparent huge pages on this system",
)
def test_large_tensors_get_huge_pages_unless_turned_off():
    assert huge_kib() >= 64 * 1024
    if "[madvise]" in THP.read_text():  # with "always" the kernel gives huge pages to every process anyway
        assert huge_kib(THP_MEM_ALLOC_ENABLE="0") == 0
