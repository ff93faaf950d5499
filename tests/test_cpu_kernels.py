"""Building and loading the C kernels (perceiver_cli/cpu_kernels.py), and falling back when that fails."""

import subprocess

import pytest

from perceiver_cli import cpu_attention, cpu_decode, cpu_kernels
from perceiver_cli.device import cpu_flags

KERNELS = (cpu_attention, cpu_decode)
needs_avx512 = pytest.mark.skipif(not set(cpu_kernels.AVX512) <= cpu_flags(), reason="needs AVX-512")


@pytest.fixture
def fresh_kernels():
    """Forget the loaded kernels before and after, so that a test's environment decides."""
    for module in KERNELS:
        module._kernel.cache_clear()
    yield
    for module in KERNELS:
        module._kernel.cache_clear()


@pytest.mark.usefixtures("fresh_kernels")
def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PERCEIVER_CPU_KERNELS", "0")
    assert not any(module.available() for module in KERNELS)


@needs_avx512
@pytest.mark.usefixtures("fresh_kernels")
def test_a_missing_compiler_leaves_pytorchs_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert not any(module.available() for module in KERNELS)


@needs_avx512
def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = cpu_kernels.build(cpu_decode.SOURCE)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build(cpu_decode.SOURCE) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C")
    with pytest.raises(subprocess.CalledProcessError):
        cpu_kernels.build(broken)
    assert [p.name for p in first.parent.iterdir()] == [first.name]
