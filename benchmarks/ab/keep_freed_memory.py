"""Prefill (fp32, bf16) and training steps (bf16, fp32) at 16k tokens, with and without glibc keeping freed
memory (device.keep_freed_memory), in alternated child processes (mallopt is process-wide); huge pages on in
both, as the command line sets them. Prints each process's times (best of 3 prefills, best of 2 steps, after
the warm-up inside best_time) and its page faults per measured pass (BENCHMARKS.md "Keeping freed memory").
With --decode: instead, the fused fp32 decode of bench --efficiency (median cached step after a 4,096-token
prompt, one refill cycle) at batch 1 and 16.

    python benchmarks/ab/keep_freed_memory.py [ROUNDS] [--decode]
"""

import os
import resource
import subprocess
import sys


def child(keep: bool, decode: bool) -> None:
    import torch

    from perceiver_cli.device import keep_freed_memory

    if keep:
        assert keep_freed_memory()
    from perceiver_cli.bench.core import VOCAB, bench_config, best_time
    from perceiver_cli.device import autocast
    from perceiver_cli.model import PerceiverAR, latent_loss

    torch.set_num_threads(2)
    torch.manual_seed(0)
    context = 16384
    model = PerceiverAR(bench_config(context))
    tokens = torch.randint(0, VOCAB, (1, context + 1))
    cpu = torch.device("cpu")
    out = []
    if decode:
        from perceiver_cli.bench.efficiency import decode_cycle

        model.eval()
        for batch in (1, 16):
            result = decode_cycle(model, batch, torch.float32, bandwidth=1.0, fused=True)
            out.append(f"decode batch {batch} fp32 fused {result['tokens_per_s']:.0f} tokens/s")
        print(f"{'keep   ' if keep else 'default'} " + ", ".join(out), flush=True)
        return

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    for dtype in (torch.float32, torch.bfloat16):
        model.eval()

        def prefill(dtype=dtype):
            with torch.no_grad(), autocast(cpu, dtype):
                model(tokens[:, :context])

        before = faults()
        seconds = best_time(prefill, 3)
        out.append(f"prefill {str(dtype)[6:]} {seconds:.3f} s ({(faults() - before) / 4:,.0f} faults)")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    for dtype in (torch.bfloat16, torch.float32):

        def step(dtype=dtype):
            with autocast(cpu, dtype):
                logits = model(tokens[:, :context])
            latent_loss(logits, tokens[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        before = faults()
        seconds = best_time(step, 2)
        out.append(f"train {str(dtype)[6:]} {seconds:.3f} s ({(faults() - before) / 3:,.0f} faults)")
    print(f"{'keep   ' if keep else 'default'} " + ", ".join(out), flush=True)


if __name__ == "__main__":
    decode = "--decode" in sys.argv
    arguments = [a for a in sys.argv[1:] if a != "--decode"]
    if arguments and arguments[0] in ("keep", "default"):
        child(arguments[0] == "keep", decode)
    else:
        rounds = int(arguments[0]) if arguments else 3
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}
        for _ in range(rounds):
            for mode in ("default", "keep"):
                subprocess.run([sys.executable, __file__, mode] + ["--decode"] * decode, env=env, check=True)
