"""A batch sampled from one prompt longer than the context (as `perceiver generate text --prompt-file` with a
long file and `-n 16 -b 16`): the shipped text and music checkpoints (`--dtype auto`), batch 16, a 6,000-token
prompt, temperature 1: seconds for the whole generation (prefill, the refill at the first new token, the
steps); the first two tokens apart. Run it in two trees for an A/B (BENCHMARKS.md "Stop 37").

    python benchmarks/ab/shared_long_prompt.py [NEW_TOKENS]
"""

import sys
import time

import torch

from perceiver_cli import runner
from perceiver_cli.device import keep_freed_memory
from perceiver_cli.generate import SamplingOptions, generate_stream


def main(new_tokens: int = 1000) -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    for name, modality in (("text-v1", "text"), ("music-v1", "music")):
        loaded = runner.load(name, modality)
        prompt = torch.randint(1, 250, (1, 6000), generator=torch.Generator().manual_seed(1)).repeat(16, 1)
        generator = torch.Generator().manual_seed(0)
        stream = generate_stream(
            loaded.model, prompt, new_tokens, SamplingOptions(), generator=generator, stepper=loaded.stepper(16),
            **loaded.decode_dtypes,
        )  # fmt: skip
        start, marks = time.perf_counter(), []
        for _ in stream:
            marks.append(time.perf_counter() - start)
        print(f"{name:9} batch 16, prompt 6000, {new_tokens} new: {marks[-1]:.2f} s in all, first token "
              f"{marks[0]:.3f} s, second (the refill) {marks[1] - marks[0]:.3f} s")  # fmt: skip


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
