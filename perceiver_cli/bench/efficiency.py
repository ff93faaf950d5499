"""`perceiver bench --efficiency`: the bench config measured against this machine's own limits, in one run.

Limits: GEMM peak (best 2048x2048 matmul, fp32 and bf16) and weight-streaming bandwidth (one matrix-vector
product over a tensor as large as the model's weights, by the fastest matvec kernel available), each measured at
the start, between the FLOP-bound and the decode parts, and at the end of the run; the highest is the limit, so a
slow moment of the VM never flatters a fraction. A plain sum's read bandwidth is recorded beside it for comparison.
Then, for the bench config of core.py:
  prefill / training step at 16k: achieved FLOP/s over the GEMM peak, FLOPs counted analytically by
      PerceiverAR.flops_per_token (2 per multiply-add; a training step counts 3x the forward); the best of 5
      prefills and of 3 training steps, each after a warm-up call; once with every input position's key/value
      projection (the issue's count) and once as the model runs by default, from the projected vocabulary
      ("_projected_vocabulary", its own FLOPs counted);
  cached decode after a 4,096-token prompt at batch 1 and 16, over one whole refill cycle (N - R cached steps
      and their one refill): the steady rate of the cached steps over the streaming ceiling, where each step
      must read every weight once plus, per row, the cross-attention cache and the latent caches it attends
      to; and the rate with the refill included. With the model's own nn.Linear layers ("model"), with fp32
      StepLinears ("fp32") and the StepLinears `step_weights_dtype` picks ("auto"), all three in PyTorch ops,
      and with the one-call C step of cpu_decode.py that `perceiver generate` runs where it is available, on
      fp32 weights and caches ("fused"), as `auto` runs it ("fused_auto": the weights `auto` picks and bf16
      caches, whose bytes the ceiling then counts at 2 per value) and as `--dtype int8` does ("fused_int8": int8
      caches, (head_dim + 4) / head_dim bytes a value with their scales, and int8 weights, 1 byte each and 4 per
      output row, below cpu_decode.INT8_MAX_ROWS rows), all three reading the cross-attention caches (the issue's
      count). By default the C step attends from the projected vocabulary instead (cpu_decode.py's
      vocabulary_attention): "fused_vocabulary" and "fused_auto_vocabulary" count the bytes it reads in the
      caches' place (each row's window of token ids, the (V, 2D) table and the window's rotary tables) and also
      give their rate against the caches' ceiling ("..._with_cross_caches"); "fused_vocabulary_one_prompt"
      (batch 16) samples every row from the same prompt, as `perceiver generate -n` does, whose prompt-pass
      latent slots the rows share and the step reads once (counted once). Each decode row also records the
      bandwidth measured right before and after it and its fraction of that ceiling (those measurements count
      toward the run's limit too), and its "paired" fraction: one matvec is timed after every 16 cached steps, and
      the steps' median rate is set against those matvecs' median (the same seconds of the VM's memory, and the
      same statistic on both sides: the run's limit is a best of 10 at its best moment), and its fraction of the
      memory's read bandwidth ("dram_read", a plain sum over 1 GiB, beyond the L3): the limit of steps whose bytes
      the L3 cannot hold (a batch-1 step, mostly served from L3, exceeds it).
bf16 rows run only where bf16 matmuls are fast (`cpu_has_fast_bf16`) unless asked for: elsewhere a bf16 GEMM
runs ~100x slower than fp32 and one bf16 training step at 16k would take hours.
"""

from __future__ import annotations

import contextlib
import time

import torch

from .. import cpu_attention, cpu_decode
from ..device import adamw, autocast, cpu_has_fast_bf16, kept_freed_memory
from ..generate import (
    SamplingOptions,
    auto_decode_dtypes,
    generate_stream,
    int8_step_weights_dtype,
    onednn_linear_available,
    step_model,
    step_weights_dtype,
)
from ..model import PerceiverAR, latent_loss
from .core import VOCAB, bench_config, best_time


def gemm_peak(dtype: torch.dtype, size: int = 2048) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / best_time(lambda: a @ b)


def streaming_bandwidth(num_elements: int) -> float:
    """Bytes per second of one fp32 matvec over `num_elements` weights (the decode-time access pattern), by the
    fastest of the kernels a step may use: MKL's gemv behind F.linear, oneDNN's on prepacked weights
    (generate.StepLinear) and the fused C step's own product (cpu_decode.linear). A ceiling from a slower kernel
    than the steps use would flatter every fraction."""
    kernels, size = _matvec_kernels(num_elements)
    return max(size / best_time(kernel, repeats=10) for kernel in kernels)


def _matvec_kernels(num_elements: int) -> tuple[list, int]:
    """The matvec kernels streaming_bandwidth tries, over one fp32 matrix of ~`num_elements`, and its bytes."""
    rows = 4096
    weight = torch.randn(rows, max(16, num_elements // rows // 16 * 16))  # the C product: rows of 16k floats
    vector = torch.randn(1, weight.shape[1])
    kernels = [lambda: torch.nn.functional.linear(vector, weight)]
    if onednn_linear_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(vector, packed, None, "none", [], ""))
    if cpu_decode.available():
        packed_weight = cpu_decode.PackedWeight(weight)  # packed once, as the C step's weights are
        kernels.append(lambda: cpu_decode.linear(vector, packed_weight))
    return kernels, weight.numel() * 4


def paired_matvec(num_elements: int):
    """A function timing one matvec of streaming_bandwidth's fastest kernel, returning its bytes per second: for
    decode_cycle's `pair_with`, which times one between blocks of cached steps."""
    kernels, size = _matvec_kernels(num_elements)
    fastest = max(kernels, key=lambda kernel: size / best_time(kernel, repeats=5))

    def measure() -> float:
        start = time.perf_counter()
        fastest()
        return size / (time.perf_counter() - start)

    return measure


def read_bandwidth(num_elements: int) -> float:
    """Bytes per second of a plain sum over `num_elements` fp32 values: what the memory gives one streaming read
    with no matrix structure, for comparison (the decode ceiling uses `streaming_bandwidth`, a matvec)."""
    values = torch.full((num_elements,), 1.0)  # (a sum runs as fast over any values)
    return values.numel() * 4 / best_time(values.sum, repeats=10)


def decode_cycle(
    model: PerceiverAR,
    batch: int,
    step_dtype,
    bandwidth: float,
    prompt_length: int = 4096,
    fused: bool = False,
    cache_dtype: torch.dtype | None = None,
    refill_dtype: torch.dtype | None = None,
    pair_with=None,
    vocabulary: bool = False,
    one_prompt: bool = False,
) -> dict:
    """Greedy decode after a prompt of `prompt_length` tokens, timed token by token over one refill cycle.

    fused: cached steps by cpu_decode's C step (as `perceiver generate` runs them where it is available);
    otherwise by PyTorch ops, on the StepLinears of `step_dtype` (None: the model's own layers). `cache_dtype`:
    the key/value caches' dtype where the C step runs, `refill_dtype` its refills' autocast (generate.DecodeState).
    `pair_with` (a `paired_matvec`): also time one matvec after every PAIR_EVERY cached steps (outside the steps'
    times) and give the steps' rate as a fraction of those matvecs' median rate: the ceiling of the very seconds
    the steps ran in. `vocabulary`: the C step attends from the projected vocabulary (cpu_decode.vocabulary_attention)
    instead of reading the cross-attention caches; bytes_per_step then counts what it reads in their place.
    `one_prompt`: every row has the same prompt (as `perceiver generate -n` samples): the C step reads the prompt
    pass's latent cache slots once for all rows (generate.DecodeState.shared_rows), and bytes_per_step counts
    them once."""
    # DecodeState takes the C step whenever it is given a stepper and the kernel is available
    with contextlib.nullcontext() if fused else _without_fused_steps(), _vocabulary_attention(fused and vocabulary):
        # bf16 or int8 caches where the C step reads them (elsewhere DecodeState keeps fp32 ones); an int8 row of
        # head_dim values carries its fp32 scale
        head_dim = model.config.head_dim
        int8_bytes = (head_dim + 4) / head_dim
        cache_bytes = {torch.bfloat16: 2, torch.int8: int8_bytes}.get(cache_dtype, 4) if fused else 4
        paths = dict(cache_dtype=cache_dtype, refill_dtype=refill_dtype)
        result = _timed_cycle(
            model, batch, step_dtype, bandwidth, prompt_length, cache_bytes, paths, pair_with, fused and vocabulary,
            one_prompt,
        )  # fmt: skip
        names = {2: "bfloat16", int8_bytes: "int8", 4: "float32"}
        return result | {"fused": fused, "cache_dtype": names[cache_bytes]}


@contextlib.contextmanager
def _vocabulary_attention(on: bool):
    before = cpu_decode.vocabulary_attention
    cpu_decode.vocabulary_attention = on
    try:
        yield
    finally:
        cpu_decode.vocabulary_attention = before


DRAM_READ_ELEMENTS = 1 << 28  # fp32 values of the sum that measures the memory's read bandwidth (1 GiB)
PAIR_EVERY = 16  # cached steps between two paired matvecs (decode_cycle's pair_with)


def _timed_cycle(
    model: PerceiverAR,
    batch: int,
    step_dtype,
    bandwidth: float,
    prompt_length: int,
    element: int,
    paths: dict,
    pair_with=None,
    vocabulary: bool = False,
    one_prompt: bool = False,
) -> dict:
    """`element`: bytes of one cached key or value number; `paths`: generate_stream's cache_dtype, refill_dtype;
    `vocabulary`: the steps attend from the projected vocabulary where the window holds as many positions as it
    has tokens (cpu_decode.FusedStep); `one_prompt`: one prompt for every row (decode_cycle)."""
    c = model.config
    cycle = c.num_latents - c.num_latents // 2  # cached steps between two refills
    rows = 1 if one_prompt else batch
    prompt = torch.randint(0, VOCAB, (rows, prompt_length), generator=torch.Generator().manual_seed(0))
    prompt = prompt.expand(batch, -1).contiguous()
    durations, windows, paired_rates = [], [], []
    stepper = None if step_dtype is None else step_model(model, step_dtype, batch)
    options = SamplingOptions(temperature=0)
    # one prompt: greedy rows would all draw the same tokens; each row is given its own (as sampling makes them)
    generator = torch.Generator().manual_seed(1)
    forced = torch.randint(0, VOCAB, (batch, cycle + 2), generator=generator) if one_prompt else None
    stream = generate_stream(model, prompt, cycle + 2, options, stepper=stepper, forced_tokens=forced, **paths)
    start = time.perf_counter()
    for step in stream:  # token 1 is the prompt's prefill; the cycle's refill and cached steps follow
        durations.append(time.perf_counter() - start)
        windows.append(step.window)
        if pair_with is not None and len(windows) % PAIR_EVERY == 0:
            paired_rates.append(pair_with())
        start = time.perf_counter()
    durations = durations[1:]  # from the first token on: the time since the token before
    steady = [(d, w) for d, w in zip(durations, windows[1:], strict=True) if not w.refill]
    step_seconds = sorted(d for d, _ in steady)[len(steady) // 2]  # median cached step
    weight_bytes = _step_weight_bytes(model, step_dtype)
    # per row and step: the cross-attention keys+values of the window and each latent layer's keys+values
    cache_bytes = [(w.end - w.start + c.num_layers * w.num_latents) * 2 * c.d_model * element for _, w in steady]
    step_bytes = weight_bytes + batch * sum(cache_bytes) / len(cache_bytes)
    rate = batch / step_seconds
    from_vocabulary = {}
    if vocabulary:  # in place of the cross-attention caches: each row's window of token ids (int64), and once per
        # step the table (V, 2D) and the window positions' rotary cos and sin (fp32)
        read = []
        # one prompt: the prompt pass's latent slots (those of the first window), read once for every row over
        # this cycle (the steady steps all come before its refill)
        shared = windows[0].num_latents if one_prompt else 0
        for _, w in steady:
            window = w.end - w.start
            latents = c.num_layers * (w.num_latents - shared * (batch - 1) / batch) * 2 * c.d_model * element
            if window < c.vocab_size:  # cpu_decode.FusedStep's rule: the caches' path
                read.append(batch * (window * 2 * c.d_model * element + latents))
            else:
                read.append(
                    batch * (window * 8 + latents) + c.vocab_size * 2 * c.d_model * 4 + window * c.rotary_dim * 4
                )
        from_vocabulary = {
            "bytes_per_step_with_cross_caches": step_bytes,
            "fraction_of_ceiling_with_cross_caches": fraction_of_ceiling(rate, bandwidth, step_bytes, batch),
        }
        step_bytes = weight_bytes + sum(read) / len(read)
    return (
        from_vocabulary
        | {
            "cross_attention": "vocabulary" if vocabulary else "caches",
            "prompts": "one for every row" if one_prompt else "one per row",
            "batch": batch,
            "step_weights": "model (nn.Linear)" if step_dtype is None else str(step_dtype).removeprefix("torch."),
            "tokens_per_s": rate,
            "ceiling_tokens_per_s": ceiling_tokens_per_s(bandwidth, step_bytes, batch),
            "fraction_of_ceiling": fraction_of_ceiling(rate, bandwidth, step_bytes, batch),
            "bytes_per_step": step_bytes,
            "tokens_per_s_with_refill": batch * len(durations) / sum(durations),
            "cached_steps": len(steady),
        }
        | (_paired(rate * step_bytes / batch, paired_rates) if paired_rates else {})
    )


def _paired(step_rate: float, matvec_rates: list[float]) -> dict:
    """The steps' bytes/s against the median of the matvecs timed between them (both medians of one span)."""
    median = sorted(matvec_rates)[len(matvec_rates) // 2]
    return {"bandwidth_paired_gb_s": median / 1e9, "fraction_of_paired_ceiling": step_rate / median}


@contextlib.contextmanager
def _without_fused_steps():
    supports, supports_model = cpu_decode.supports, cpu_decode.supports_model
    cpu_decode.supports = cpu_decode.supports_model = lambda *args: False
    try:
        yield
    finally:
        cpu_decode.supports, cpu_decode.supports_model = supports, supports_model


def _step_weight_bytes(model: PerceiverAR, step_dtype) -> float:
    """Bytes of the weights one cached step reads: every parameter once, linear weights in the step dtype (int8
    with an fp32 scale per output row), the input embedding not at all (a step looks up one row; a tied head
    reads the matrix as a linear layer)."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for parameter in module.parameters(recurse=False):
            linear = isinstance(module, torch.nn.Linear) and step_dtype is not None
            element = torch.empty(0, dtype=step_dtype).element_size() if linear else 4
            total += parameter.numel() * element + (4 * parameter.shape[0] if linear and element == 1 else 0)
    return total


def ceiling_tokens_per_s(bandwidth: float, step_bytes: float, batch: int) -> float:
    """Tokens/s if every step read its bytes at `bandwidth` (bytes/s) and did nothing else."""
    return bandwidth / step_bytes * batch


def fraction_of_ceiling(rate: float, bandwidth: float, step_bytes: float, batch: int) -> float:
    # one expression for every fraction of a ceiling, so fractions against the same bandwidth compare exactly
    return rate / ceiling_tokens_per_s(bandwidth, step_bytes, batch)


def use_higher_limits(
    results: dict, peaks_again: dict[str, float], bandwidth_again: float, when: str = "end"
) -> None:
    """Record the limits measured again `when` ("middle", "end"); where one is higher than the limit so far, it
    becomes the denominator of every fraction that used it (FLOP/s and bytes/s in, as `run` measures them)."""
    results[f"gemm_peak_gflops_{when}"] = {name: peak / 1e9 for name, peak in peaks_again.items()}
    results[f"bandwidth_gb_s_{when}"] = bandwidth_again / 1e9
    for name, peak in peaks_again.items():
        so_far = results["gemm_peak_gflops"][name] * 1e9
        if peak > so_far:
            results["gemm_peak_gflops"][name] = peak / 1e9
            for entry in results.values():
                if isinstance(entry, dict) and entry.get("gemm_peak") == name:
                    entry["fraction_of_peak"] = entry["flops"] / entry["seconds"] / peak
    so_far = results["bandwidth_gb_s"] * 1e9
    if bandwidth_again > so_far:
        results["bandwidth_gb_s"] = bandwidth_again / 1e9
        for key, entry in results.items():
            if key.startswith("decode_"):
                step = (bandwidth_again, entry["bytes_per_step"], entry["batch"])
                entry["ceiling_tokens_per_s"] = ceiling_tokens_per_s(*step)
                entry["fraction_of_ceiling"] = fraction_of_ceiling(entry["tokens_per_s"], *step)
                if "bytes_per_step_with_cross_caches" in entry:
                    step = (bandwidth_again, entry["bytes_per_step_with_cross_caches"], entry["batch"])
                    entry["fraction_of_ceiling_with_cross_caches"] = fraction_of_ceiling(
                        entry["tokens_per_s"], *step
                    )


def run(context: int = 16384, threads: int = 2, bf16: bool | None = None, log=print) -> dict:
    """`bf16`: also measure bf16 autocast (None: only where bf16 matmuls are fast)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = bench_config(context)
    model = PerceiverAR(config)
    parameters = model.num_parameters()
    with_bf16 = cpu_has_fast_bf16() if bf16 is None else bf16
    results: dict = {"parameters": parameters, "context": context, "bf16_measured": with_bf16}
    # which kernel bf16 inference attends with
    results["bf16_attention_kernel"] = "perceiver_cli/cpu_attention.c" if cpu_attention.available() else "PyTorch"
    # whether our kernels' bf16 products run on AMX tiles (Intel Sapphire Rapids and later)
    results["amx"] = {"attention": cpu_attention.amx_on(), "decode_batch_products": cpu_decode.amx_available()}
    # whether glibc keeps freed activations for reuse (device.keep_freed_memory; the command line turns it on)
    results["keep_freed_memory"] = kept_freed_memory()
    peaks = {"fp32": gemm_peak(torch.float32)}
    if with_bf16:
        peaks["bf16"] = gemm_peak(torch.bfloat16)
    bandwidth = streaming_bandwidth(parameters)
    results.update(gemm_peak_gflops={k: v / 1e9 for k, v in peaks.items()}, bandwidth_gb_s=bandwidth / 1e9)
    log(
        "GEMM peak "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
        + f"; stream {bandwidth / 1e9:.1f} GB/s"
    )
    tokens = torch.randint(0, VOCAB, (1, context + 1))
    device = torch.device("cpu")
    # Two ways to compute the cross-attention's keys and values: the FLOP count projects every input
    # position (the rows without a suffix, comparable with every earlier run); the model by default projects the
    # vocabulary's rows once where that costs less (PerceiverAR.project_vocabulary), fewer FLOPs in less
    # time: its rows ("_projected_vocabulary") count the FLOPs it does.
    for name in peaks:
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        for suffix, projected in (("", False), ("_projected_vocabulary", True)):
            model.project_vocabulary = projected
            forward_flops = model.flops_per_token(context, projected_vocabulary=projected)["total"]
            model.eval()

            def prefill(dtype=dtype):
                with torch.no_grad(), autocast(device, dtype):
                    model(tokens[:, :context])

            seconds = best_time(prefill, repeats=5)  # best of 5, as the GEMM peak it is set against
            results[f"prefill_{name}{suffix}"] = {
                "seconds": seconds,
                "flops": forward_flops,
                "fraction_of_peak": forward_flops / seconds / peaks[name],
                "gemm_peak": name,
            }
            model.train()
            optimizer = adamw(list(model.parameters()), lr=1e-5)

            def step(dtype=dtype, optimizer=optimizer):
                with autocast(device, dtype):
                    logits = model(tokens[:, :context])
                latent_loss(logits, tokens[:, 1:]).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            # best of 3 after a warm-up: a step's first two or three calls run slow while the allocator's heap and
            # huge pages fill in (BENCHMARKS.md "Stop 33"), so one timed call after one warm-up was still among them
            seconds = best_time(step, repeats=3)
            results[f"train_{name}{suffix}"] = {
                "seconds": seconds,
                "flops": 3 * forward_flops,
                "fraction_of_peak": 3 * forward_flops / seconds / peaks[name],
                "gemm_peak": name,
            }
            log(
                f"{name}{suffix}: prefill {results[f'prefill_{name}{suffix}']}, train {results[f'train_{name}{suffix}']}"
            )
    model.project_vocabulary = True
    # This VM's speed drifts (a 2048^2 fp32 GEMM measured 126, 176 and 183 GFLOP/s within one hour, and
    # 158-195 within twenty minutes, nothing else running): measure the limits again between the parts and
    # at the end, and keep the highest as the denominator.
    use_higher_limits(results, _gemm_peaks(peaks), streaming_bandwidth(parameters), when="middle")
    bandwidth = results["bandwidth_gb_s"] * 1e9
    model.eval()
    results["read_bandwidth_gb_s"] = read_bandwidth(parameters) / 1e9
    # The same sum over 1 GiB: more than a CPU's cores keep in L3 (a model-sized matvec, the ceiling above, can be
    # served from L3: on the Xeon of stop 36 a sum over 100 MB read 52 GB/s, over 150 MB-2 GB 25-30 GB/s), so the
    # memory's own read bandwidth, the limit of a step that reads more than the L3 holds (batch-16 steps)
    dram = read_bandwidth(DRAM_READ_ELEMENTS)
    results["dram_read_bandwidth_gb_s"] = dram / 1e9
    highest_adjacent = 0.0
    pair = paired_matvec(parameters)
    for batch in (1, 16):
        auto = step_weights_dtype(device, batch, torch.float32)  # decoding on a CPU computes in fp32
        steps = [("model", None), ("fp32", torch.float32)] + ([("auto", auto)] if auto != torch.float32 else [])
        if cpu_decode.available():  # the C step: `--dtype fp32` (fp32 weights and caches), and `auto` (the
            # weights step_weights_dtype picks, and generate.auto_decode_dtypes' caches and refills)
            steps += [("fused", torch.float32), ("fused_auto", auto)]
            if cpu_decode.supports_int8(model):  # and as `--dtype int8` decodes (runner.Loaded.stepper)
                steps += [("fused_int8", int8_step_weights_dtype(batch, auto))]
            # The rows above read the cross-attention caches, the bytes the ceiling counts (comparable with
            # every earlier run); by default the C step attends from the projected vocabulary instead and reads
            # fewer: these rows give its rate against both ceilings (its own bytes and the caches')
            steps += [("fused_vocabulary", torch.float32), ("fused_auto_vocabulary", auto)]
            if batch > 1:  # and batch sampling from one prompt, whose cached slots the rows share (stop 37)
                steps += [("fused_vocabulary_one_prompt", torch.float32)]
        for label, step_dtype in steps:
            # This VM's bandwidth moves within minutes (32-59 GB/s in one run): measure it right before and
            # after each row as well; the row's fraction of that "adjacent" ceiling says how close the code is to
            # the memory of its own minute, and every adjacent measurement also counts for the run's limit.
            before = streaming_bandwidth(parameters)
            auto_paths = label.startswith(("fused_auto", "fused_int8"))
            paths = auto_decode_dtypes(device) if auto_paths else {}
            paths |= {"cache_dtype": torch.int8} if label == "fused_int8" else {}
            fused, vocabulary = label.startswith("fused"), "_vocabulary" in label
            one_prompt = label.endswith("_one_prompt")
            result = decode_cycle(
                model, batch, step_dtype, bandwidth, fused=fused, pair_with=pair, vocabulary=vocabulary,
                one_prompt=one_prompt, **paths,
            )  # fmt: skip
            adjacent = max(before, streaming_bandwidth(parameters))
            highest_adjacent = max(highest_adjacent, adjacent)
            result["fraction_of_dram_read_ceiling"] = fraction_of_ceiling(
                result["tokens_per_s"], dram, result["bytes_per_step"], batch
            )
            result["bandwidth_adjacent_gb_s"] = adjacent / 1e9
            result["fraction_of_adjacent_ceiling"] = fraction_of_ceiling(
                result["tokens_per_s"], adjacent, result["bytes_per_step"], batch
            )
            results[f"decode_batch{batch}_{label}"] = result
            log(f"decode batch {batch} ({label}): {result}")
    end_bandwidth = streaming_bandwidth(parameters)
    use_higher_limits(results, _gemm_peaks(peaks), max(end_bandwidth, highest_adjacent), when="end")
    results["bandwidth_gb_s_end"] = end_bandwidth / 1e9  # the end measurement itself (the limit includes the rows')
    return results


def _gemm_peaks(names) -> dict[str, float]:
    return {name: gemm_peak(torch.float32 if name == "fp32" else torch.bfloat16) for name in names}
