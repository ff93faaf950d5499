"""Perceiver AR: long-context autoregressive generation of music, images and text.

Based on Hawthorne et al. 2022, "General-purpose, long-context autoregressive modeling with Perceiver AR"
(arXiv:2202.07765). The public API is listed in __all__.
"""

__version__ = "0.1.0"

from .generate import SamplingOptions, generate, generate_stream, window_schedule  # noqa: E402
from .model import PerceiverAR, PerceiverARConfig, latent_loss  # noqa: E402

__all__ = [
    "PerceiverAR",
    "PerceiverARConfig",
    "SamplingOptions",
    "__version__",
    "generate",
    "generate_stream",
    "latent_loss",
    "window_schedule",
]
