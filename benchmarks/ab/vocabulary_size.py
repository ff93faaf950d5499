"""Where projecting the vocabulary stops paying: `PerceiverAR.input_key_value` (the cross-attention's keys and
values) with every position projected and from the projected vocabulary, for larger vocabularies and batches at
4,096 positions, d_model 512, fp32 and bf16 autocast inference, best of 5 (BENCHMARKS.md "Stop 35"). Under bf16
on an AMX CPU the table's product runs on cpu_linear's bf16 products like the positions'; elsewhere it stays fp32.

    python benchmarks/ab/vocabulary_size.py
"""

import torch

from perceiver_cli.bench.core import best_time
from perceiver_cli.device import keep_freed_memory
from perceiver_cli.model import PerceiverAR, PerceiverARConfig


def main() -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    print("| vocabulary | batch x 4,096 | positions / rows | dtype | every position | projected vocabulary |")
    print("|---:|---:|---:|---|---:|---:|")
    for vocabulary, batch in ((388, 4), (2000, 1), (4000, 1), (8000, 2), (8000, 4), (8000, 8)):
        config = PerceiverARConfig(
            vocab_size=vocabulary, max_context=4096, num_latents=512, d_model=512, num_heads=8, num_layers=1
        )
        model = PerceiverAR(config).eval()
        tokens = torch.randint(0, vocabulary, (batch, 4096))
        positions = torch.arange(4096)[None]
        for dtype in (torch.float32, torch.bfloat16):
            seconds = []
            for projected in (False, True):
                model.project_vocabulary = projected
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    # _vocabulary_cost bypassed: both paths timed whatever it would choose
                    model._vocabulary_cost = (lambda table: 0) if projected else model._vocabulary_cost
                    seconds.append(best_time(lambda m=model, t=tokens, p=positions: m.input_key_value(t, p), 5))
                    del model._vocabulary_cost
            print(
                f"| {vocabulary:,} | {batch} | {batch * 4096 / vocabulary:.1f} | {str(dtype).removeprefix('torch.')} "
                f"| {seconds[0] * 1e3:.1f} ms | {seconds[1] * 1e3:.1f} ms |"
            )


if __name__ == "__main__":
    main()
