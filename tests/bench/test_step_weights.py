"""`perceiver bench --step-weights` and the decode part of `--efficiency`, on tiny models."""

import json
import math

import pretty_midi
import torch
import typer
from typer.testing import CliRunner

from perceiver_cli import cpu_decode
from perceiver_cli.bench.efficiency import _step_weight_bytes, decode_cycle
from perceiver_cli.bench.step_weights import forced_decode
from perceiver_cli.cli import bench as bench_cli
from perceiver_cli.device import cpu_has_fast_bf16
from perceiver_cli.model import PerceiverAR, PerceiverARConfig
from perceiver_cli.train.prepare import PrepareOptions, prepare


def _tiny(max_context=64, latents=16) -> PerceiverAR:
    torch.manual_seed(0)
    config = PerceiverARConfig(
        vocab_size=388, max_context=max_context, num_latents=latents, d_model=32, num_heads=4, num_layers=2
    )
    return PerceiverAR(config).eval()


def test_forced_decode_scores_the_given_continuation_exactly_once():
    model = _tiny()
    document = torch.randint(0, 388, (90,), generator=torch.Generator().manual_seed(1))
    bits, scored, seconds = forced_decode(model, document, 30, None)
    assert scored == 60 and seconds > 0
    # the same bits as scoring each token with a full forward over its window (the cached path is exact)
    logits = torch.stack(
        [
            s.logits[0]
            for s in __import__("perceiver_cli").generate_stream(
                model, document[None, :30], 60, forced_tokens=document[None, 30:], use_cache=False
            )
        ]
    )
    reference = torch.nn.functional.cross_entropy(logits, document[30:], reduction="sum").item() / math.log(2)
    assert abs(bits - reference) < 1e-3 * scored


def test_step_weight_bytes_halve_the_linear_weights_in_bf16():
    model = _tiny()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert _step_weight_bytes(model, None) == 4 * model.num_parameters()
    assert _step_weight_bytes(model, torch.bfloat16) == 4 * model.num_parameters() - 2 * linear
    rows = sum(m.weight.shape[0] for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert _step_weight_bytes(model, torch.int8) == 4 * model.num_parameters() - 3 * linear + 4 * rows


def test_decode_cycle_times_one_refill_cycle(monkeypatch):
    import perceiver_cli.bench.efficiency as efficiency

    monkeypatch.setattr(efficiency, "VOCAB", 388)
    result = decode_cycle(_tiny(), 2, torch.float32, bandwidth=1e10, prompt_length=64)
    assert result["cached_steps"] == 16 - 8  # N - R cached steps between two refills
    assert 0 < result["tokens_per_s_with_refill"] <= result["tokens_per_s"] * 1.5
    assert 0 < result["fraction_of_ceiling"] and result["bytes_per_step"] > _step_weight_bytes(_tiny(), None)


def test_step_weights_command(tmp_path, music_checkpoint):
    app = typer.Typer()
    bench_cli.register(app)
    app.command("noop")(lambda: None)  # typer needs two commands to route by name
    midi = tmp_path / "midi"
    midi.mkdir()
    for i in range(8):
        pm = pretty_midi.PrettyMIDI()
        piano = pretty_midi.Instrument(program=0)
        for n in range(80):
            piano.notes.append(
                pretty_midi.Note(velocity=80, pitch=50 + (n + i) % 12, start=n * 0.1, end=n * 0.1 + 0.08)
            )
        pm.instruments.append(piano)
        pm.write(str(midi / f"piece_{i}.mid"))
    prepare("music", [midi], tmp_path / "prepared", PrepareOptions(val_fraction=0.5))
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--step-weights",
            "-c",
            str(music_checkpoint),
            "--data",
            str(tmp_path / "prepared"),
            "--json",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    labels = ["fp32 (exact)", "bf16 step weights"]
    labels += ["bf16 step weights, bf16 caches"] if cpu_decode.available() else []  # only the C step reads them
    if cpu_decode.available() and cpu_has_fast_bf16():  # and bf16 refills where bf16 matmuls are fast
        labels += ["bf16 step weights, bf16 caches, bf16 refills"]
    assert [row["weights"] for row in summary["rows"]] == labels
    assert abs(summary["bits_change"]) < 0.05 and summary["scored_tokens"] > 0
    assert abs(summary.get("bits_change_bf16_caches", 0.0)) < 0.05
    assert abs(summary.get("bits_change_bf16_refills", 0.0)) < 0.05
    missing = CliRunner().invoke(app, ["bench", "--step-weights", "-c", str(music_checkpoint)])
    assert missing.exit_code == 2 and "needs --checkpoint and --data" in missing.output


def test_efficiency_keeps_the_higher_of_the_start_and_end_limits():
    from perceiver_cli.bench.efficiency import use_higher_limits

    results = {
        "gemm_peak_gflops": {"fp32": 100.0, "bf16": 400.0},
        "bandwidth_gb_s": 10.0,
        # FLOPs and seconds as measured against the peak so far (GFLOP/s above)
        "prefill_fp32": {"flops": 80e9, "seconds": 1.0, "fraction_of_peak": 0.8, "gemm_peak": "fp32"},
        "train_fp32": {"flops": 60e9, "seconds": 1.0, "fraction_of_peak": 0.6, "gemm_peak": "fp32"},
        "prefill_bf16": {"flops": 200e9, "seconds": 1.0, "fraction_of_peak": 0.5, "gemm_peak": "bf16"},
        "train_bf16": {"flops": 160e9, "seconds": 1.0, "fraction_of_peak": 0.4, "gemm_peak": "bf16"},
        # 1e8 bytes per step at 10 GB/s: 100 tokens/s at most; 50 measured
        "decode_batch1_fp32": {
            "batch": 1,
            "tokens_per_s": 50.0,
            "bytes_per_step": 1e8,
            "ceiling_tokens_per_s": 100.0,
            "fraction_of_ceiling": 0.5,
        },
    }
    # fp32 was faster at the end: its fractions shrink; bf16 was slower at the end: kept; bandwidth higher
    use_higher_limits(results, {"fp32": 200e9, "bf16": 300e9}, bandwidth_again=20e9)
    assert results["gemm_peak_gflops"] == {"fp32": 200.0, "bf16": 400.0}
    assert results["prefill_fp32"]["fraction_of_peak"] == 0.4 and results["train_fp32"]["fraction_of_peak"] == 0.3
    assert results["prefill_bf16"]["fraction_of_peak"] == 0.5
    decode = results["decode_batch1_fp32"]
    assert decode["ceiling_tokens_per_s"] == 200.0 and decode["fraction_of_ceiling"] == 0.25
    assert (
        results["gemm_peak_gflops_end"] == {"fp32": 200.0, "bf16": 300.0} and results["bandwidth_gb_s_end"] == 20.0
    )
    # a later measurement compares with the highest so far, and is recorded under its own name
    use_higher_limits(results, {"fp32": 150e9, "bf16": 800e9}, bandwidth_again=10e9, when="middle")
    assert results["gemm_peak_gflops"] == {"fp32": 200.0, "bf16": 800.0}
    assert (
        results["prefill_bf16"]["fraction_of_peak"] == 0.25 and results["prefill_fp32"]["fraction_of_peak"] == 0.4
    )
    assert results["bandwidth_gb_s"] == 20.0 and results["bandwidth_gb_s_middle"] == 10.0
