"""Long-context training-step benchmarks: the isolated runner's limits, the doubling search, the table."""

import pytest

from perceiver_cli.bench import long_context
from perceiver_cli.bench.core import run_isolated


def test_a_step_over_the_memory_limit_is_stopped_and_reported():
    case = {"kind": "train", "impl": "perceiver", "context": 2048, "threads": 1, "repeats": 0}
    result = run_isolated(case, memory_limit_mib=100)  # the interpreter with torch alone needs more
    assert "memory limit" in result["error"] and "seconds" not in result


def test_max_context_doubles_until_a_limit_stops_it():
    # short steps of the bench config fit in a few GiB; 200 MiB cannot even hold the model
    found = long_context.max_context(
        "perceiver", start=1024, stop=1024, threads=1, memory_limit_mib=4096, log=print
    )
    assert found["largest_context"] == 1024 and [a["context"] for a in found["attempts"]] == [1024]
    assert found["stopped_by"].startswith("reached --stop")
    stopped = long_context.max_context("transformer", start=1024, threads=1, memory_limit_mib=200, log=print)
    assert stopped["largest_context"] is None and "memory limit" in stopped["stopped_by"]


@pytest.mark.slow  # three bench-config subprocesses (~30 s on 2 cores)
def test_long_context_table_compares_both_paths():
    rows = long_context.long_context_table(
        contexts=[1536, 3072], ordinary_contexts=[3072], threads=1, log=lambda line: None
    )
    assert [(r["path"], r["context"]) for r in rows] == [
        ("recomputed", 1536),
        ("recomputed", 3072),
        ("ordinary", 3072),
    ]
    assert all(r["seconds"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert "marginal_bytes_per_token" in rows[1]
    assert "| 3,072 | ordinary |" in long_context.markdown(rows)
