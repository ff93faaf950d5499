"""`perceiver bench --efficiency` end to end on a tiny config: every row, and limits measured three times."""

import perceiver_cli.bench.efficiency as efficiency
from perceiver_cli.model import PerceiverARConfig


def test_efficiency_run_measures_every_row_against_the_highest_limits(monkeypatch):
    monkeypatch.setattr(efficiency, "VOCAB", 64)
    monkeypatch.setattr(
        efficiency,
        "bench_config",
        lambda context: PerceiverARConfig(
            vocab_size=64, max_context=4096, num_latents=32, d_model=64, num_heads=2, num_layers=1
        ),
    )
    monkeypatch.setattr(efficiency, "DRAM_READ_ELEMENTS", 1 << 20)  # (the run's own: 1 GiB)
    results = efficiency.run(context=256, bf16=False, log=lambda line: None)
    assert set(results["gemm_peak_gflops"]) == {"fp32"}
    for when in ("middle", "end"):  # the denominators are the highest of the three measurements
        assert results["gemm_peak_gflops"]["fp32"] >= results[f"gemm_peak_gflops_{when}"]["fp32"]
        assert results["bandwidth_gb_s"] >= results[f"bandwidth_gb_s_{when}"]
    for kind in ("prefill_fp32", "train_fp32"):
        for row in (results[kind], results[f"{kind}_projected_vocabulary"]):
            assert 0 < row["fraction_of_peak"] and row["seconds"] > 0
            peak = results["gemm_peak_gflops"]["fp32"] * 1e9
            assert abs(row["fraction_of_peak"] - row["flops"] / row["seconds"] / peak) < 1e-9
        # the projected vocabulary's rows count its 64 rows' key/value projections where the other counts 256
        saved = 2 * (256 - 64) * 2 * 64 * 64 * (3 if kind.startswith("train") else 1)
        assert results[kind]["flops"] - results[f"{kind}_projected_vocabulary"]["flops"] == saved
    for batch in (1, 16):
        fp32 = results[f"decode_batch{batch}_fp32"]
        assert results[f"decode_batch{batch}_model"]["step_weights"] == "model (nn.Linear)"
        assert fp32["step_weights"] == "float32" and fp32["cached_steps"] == 16  # N - R steps of one cycle
        ceiling = results["bandwidth_gb_s"] * 1e9 / fp32["bytes_per_step"] * batch
        assert abs(fp32["ceiling_tokens_per_s"] - ceiling) < 1e-6 * ceiling
        assert not fp32["fused"]  # the PyTorch rows stay PyTorch even where the C step is available
        fused = results.get(f"decode_batch{batch}_fused")
        assert (fused is not None) == efficiency.cpu_decode.available()
        assert fused is None or (fused["fused"] and fused["bytes_per_step"] == fp32["bytes_per_step"])
        auto = results.get(f"decode_batch{batch}_fused_auto")  # as `auto` decodes: bf16 caches, counted as such
        assert (auto is not None) == efficiency.cpu_decode.available()
        assert auto is None or (
            auto["cache_dtype"] == "bfloat16" and auto["bytes_per_step"] < fused["bytes_per_step"]
        )
        for label, caches in (("fused_vocabulary", fused), ("fused_auto_vocabulary", auto)):
            # by default the C step attends from the projected vocabulary (64 tokens: every window of the cycle
            # holds more positions): its own bytes replace the cross-attention caches' by token ids and tables,
            # and its rate is also given against the caches' ceiling
            row = results.get(f"decode_batch{batch}_{label}")
            assert (row is not None) == efficiency.cpu_decode.available()
            if row is None:
                continue
            assert row["cross_attention"] == "vocabulary" and caches["cross_attention"] == "caches"
            assert row["bytes_per_step_with_cross_caches"] == caches["bytes_per_step"] > row["bytes_per_step"]
            expected = efficiency.fraction_of_ceiling(
                row["tokens_per_s"], results["bandwidth_gb_s"] * 1e9, caches["bytes_per_step"], batch
            )
            # (within rounding: the run keeps the bandwidth in GB/s)
            assert abs(row["fraction_of_ceiling_with_cross_caches"] - expected) <= 1e-9 * expected
        # batch sampling from one prompt: the prompt pass's 16 latent slots of the one layer, read once for all
        # rows (16 x (batch - 1) rows of 2 x 64 fp32 fewer a step); the bytes as for one prompt per row
        one_prompt = results.get(f"decode_batch{batch}_fused_vocabulary_one_prompt")
        assert (one_prompt is not None) == (batch > 1 and efficiency.cpu_decode.available())
        if one_prompt is not None:
            vocabulary = results[f"decode_batch{batch}_fused_vocabulary"]
            assert (one_prompt["prompts"], vocabulary["prompts"]) == ("one for every row", "one per row")
            saved = 16 * (batch - 1) * 2 * 64 * 4
            assert abs(vocabulary["bytes_per_step"] - one_prompt["bytes_per_step"] - saved) < 1e-6 * saved
            assert one_prompt["bytes_per_step_with_cross_caches"] == fused["bytes_per_step"]
        int8 = results.get(f"decode_batch{batch}_fused_int8")  # as `--dtype int8` decodes: int8 caches
        assert (int8 is not None) == efficiency.cpu_decode.available()
        assert int8 is None or (int8["cache_dtype"] == "int8" and int8["bytes_per_step"] < auto["bytes_per_step"])
        # the bandwidth beside each row is one of the measurements the run's limit is the highest of
        assert 0 < fp32["bandwidth_adjacent_gb_s"] <= results["bandwidth_gb_s"]
        assert fp32["fraction_of_adjacent_ceiling"] >= fp32["fraction_of_ceiling"]
        # and against the matvecs timed between its own steps (one per 16 cached steps)
        paired = fp32["bandwidth_paired_gb_s"] * 1e9
        assert paired > 0
        expected = fp32["tokens_per_s"] * fp32["bytes_per_step"] / batch / paired
        assert abs(fp32["fraction_of_paired_ceiling"] - expected) < 1e-9 * expected
    assert results["read_bandwidth_gb_s"] > 0 and results["dram_read_bandwidth_gb_s"] > 0
    for name, row in results.items():  # each decode row against the memory's read bandwidth too
        if name.startswith("decode_"):
            dram = results["dram_read_bandwidth_gb_s"] * 1e9
            expected = row["tokens_per_s"] * row["bytes_per_step"] / row["batch"] / dram
            assert abs(row["fraction_of_dram_read_ceiling"] - expected) <= 1e-9 * expected
    # which of our kernels multiplied on AMX tiles: where the CPU has AMX and Linux granted its tile state
    assert results["amx"] == {
        "attention": efficiency.cpu_attention.amx_on(),
        "decode_batch_products": efficiency.cpu_decode.amx_available(),
    }
