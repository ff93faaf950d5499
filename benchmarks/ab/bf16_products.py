"""bf16 products in the fused C step (batches of 4+ rows with bf16 weights on AVX512-BF16): quality and speed.

Quality: 4 validation documents of a shipped checkpoint decoded as one batch of 4 rows, teacher-forced through
the very path `perceiver generate` samples with (2,048-token prompts, 512 scored tokens each), with the bf16
products on and off, against the exact fp32 path. Speed: the bench config at batch 16 as `auto` decodes it,
on and off alternated (BENCHMARKS.md "bf16 products").

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab/bf16_products.py
"""

import math

import torch
import torch.nn.functional as F

from perceiver_cli import cpu_decode
from perceiver_cli.bench.core import bench_config
from perceiver_cli.bench.efficiency import decode_cycle, streaming_bandwidth
from perceiver_cli.checkpoint import load_checkpoint
from perceiver_cli.generate import SamplingOptions, generate_stream, step_model
from perceiver_cli.model import PerceiverAR
from perceiver_cli.train.prepare import PreparedData

torch.set_num_threads(2)
bf16, OFF = torch.bfloat16, 10**9
for name, data in (("music-v1", "data/music"), ("image-v1", "data/image_default"), ("text-v1", "data/text")):
    model = load_checkpoint(name).model.eval()
    documents = [d for d in PreparedData(data).documents("val") if len(d) >= 2560][:4]
    batch = torch.stack([torch.as_tensor(d[:2560].astype("int64")) for d in documents])
    prompt, continuation = batch[:, :2048], batch[:, 2048:]
    stepper = step_model(model, bf16, len(documents))
    results = {}
    for label, rows, fast in (("exact fp32", OFF, False), ("bf16 products off", OFF, True), ("on", 4, True)):
        cpu_decode.BF16_PRODUCTS_ROWS = rows
        paths = dict(stepper=stepper, cache_dtype=bf16, refill_dtype=bf16) if fast else {}
        stream = generate_stream(model, prompt, 512, SamplingOptions(0), forced_tokens=continuation, **paths)
        nats = sum(
            F.cross_entropy(s.logits, continuation[:, i], reduction="sum").item() for i, s in enumerate(stream)
        )
        results[label] = nats / math.log(2) / continuation.numel()
    print(
        f"{name} ({len(documents)} rows x 512 tokens): "
        + ", ".join(f"{label} {bits:.6f}" for label, bits in results.items())
        + f" bits/token; products on - off {results['on'] - results['bf16 products off']:+.6f}",
        flush=True,
    )
torch.manual_seed(0)
model = PerceiverAR(bench_config(16384)).eval()
bandwidth = streaming_bandwidth(model.num_parameters())
for round in range(3):
    for label, rows in (("off", OFF), ("on", 4)):
        cpu_decode.BF16_PRODUCTS_ROWS = rows
        r = decode_cycle(model, 16, bf16, bandwidth, fused=True, cache_dtype=bf16, refill_dtype=bf16)
        print(
            f"round {round} batch 16 bf16 products {label:3s}: {r['tokens_per_s']:6.1f} tokens/s, "
            f"with the refill {r['tokens_per_s_with_refill']:.1f}",
            flush=True,
        )
