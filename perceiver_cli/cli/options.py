"""Option aliases shared by several commands, so every command spells them the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda (auto picks CUDA when present).")]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype", help="auto | fp32 | bf16. auto: bf16 autocast on CUDA and on CPUs with AVX512-BF16/AMX."
    ),
]
GenerateDtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto | fp32 | bf16 | int8. auto: bf16 autocast on CUDA; on a CPU token-by-token steps read bf16 "
        "copies of the weights (faster; with AVX-512 and a C compiler each step is one C call, fp32 arithmetic); "
        "fp32: exact fp32 throughout; int8: auto with int8 copies of the step weights (CPU with AVX-512: half "
        "the bytes of bf16, faster for one sample, at a small measured quality cost; see BENCHMARKS.md).",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
Json = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed (same seed, same output).")]
Latents = Annotated[
    int | None, typer.Option("--latents", help="Number of latents N at inference: the eval-time compute budget.")
]
CheckpointOpt = Annotated[
    str | None, typer.Option("--checkpoint", "-c", help="Checkpoint name or directory (default: the shipped one).")
]
OutPath = Annotated[Path | None, typer.Option("--out", "-o", help="Output file.")]
