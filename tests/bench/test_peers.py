"""The side-by-side table against other implementations: rows, ratios against the targets, missing peers."""

import typer
from typer.testing import CliRunner

from perceiver_cli.bench import peers
from perceiver_cli.cli import bench as bench_cli


def _row(impl, kind, context, **values):
    return {"impl": impl, "kind": kind, "context": context, "peak_rss_mib": 1024.0, **values}


def test_ratios_compare_ours_with_each_peer():
    results = [
        _row("perceiver", "prefill", 16384, seconds=0.5),
        _row("krasserm", "prefill", 16384, seconds=1.5),
        _row("lucidrains", "prefill", 16384, seconds=2.0),
        _row("perceiver", "decode", 4096, cached=True, tokens_per_s=60.0),
        _row("krasserm", "decode", 4096, cached=True, tokens_per_s=20.0),
        _row("perceiver", "train", 16384, seconds=2.0),
        {**_row("krasserm", "train", 16384, seconds=4.0), "peak_rss_mib": 4096.0},
        {"impl": "lucidrains", "kind": "train", "context": 16384, "error": "memory limit (24,576 MiB) exceeded"},
    ]
    header, rows, ratios = peers.summarise_peers(results)
    assert header == ["measurement", "ours", "krasserm", "lucidrains"]
    assert ["prefill T=16,384", "0.5 s", "1.5 s", "2 s"] in rows
    assert ["train step T=16,384", "2 s", "4 s", "failed"] in rows
    assert "prefill 16,384: ours 3.00x faster than krasserm (target >= 2x)" in ratios
    assert "cached decode: ours 3.00x the tokens/s of krasserm (target >= 2x)" in ratios
    assert any(
        line.startswith("train 16,384: ours 2.00x faster than krasserm, 4.00x less peak memory") for line in ratios
    )


def test_every_implementation_gets_the_same_cases():
    cases = peers.peer_cases(quick=True)
    for impl in ("perceiver", "krasserm", "lucidrains"):
        assert {(c["kind"], c["context"]) for c in cases if c["impl"] == impl} >= {
            ("prefill", 4096),
            ("train", 4096),
        }
    assert not [c for c in cases if c["impl"] == "lucidrains" and c["kind"] == "decode"]  # it has no cache


def test_missing_peers_are_a_one_line_error(monkeypatch):
    monkeypatch.setattr(peers, "available", lambda impl: False)
    app = typer.Typer()
    bench_cli.register(app)
    app.command("noop")(lambda: None)  # typer needs two commands to route by name
    result = CliRunner().invoke(app, ["bench", "--peers"])
    assert result.exit_code != 0
    assert "--peers needs krasserm, lucidrains installed" in result.output and "Traceback" not in result.output
