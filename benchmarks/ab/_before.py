"""The decode code before the oneDNN step weights and transposed caches, as patches for the A/B scripts here."""

import sys

import perceiver_cli.generate  # noqa: F401  (loads the module; the package's `generate` name is a function)

generation = sys.modules["perceiver_cli.generate"]
current_allocate = generation.DecodeState._allocate


def contiguous_allocate(self, like):
    """DecodeState._allocate before: every cache stored (B, H, T, Dh)."""
    c = self.model.config
    cross = (self.batch, c.num_heads, self.cross_capacity, c.head_dim)
    self.cross_key, self.cross_value = like.new_empty(cross), like.new_empty(cross)
    latent = (self.batch, c.num_heads, self.latent_capacity, c.head_dim)
    self.latent_keys = [like.new_empty(latent) for _ in self.model.layers]
    self.latent_values = [like.new_empty(latent) for _ in self.model.layers]


def use_caches(before: bool) -> None:
    generation.DecodeState._allocate = contiguous_allocate if before else current_allocate


def step_model(model, dtype, rows=1, before=False):
    """generate.step_model; before=True drops the oneDNN prepacking (the BLAS forms StepLinear had)."""
    stepper = generation.step_model(model, dtype, rows)
    if before:
        for module in stepper.modules():
            if isinstance(module, generation.StepLinear):
                module.packed = None
    return stepper
