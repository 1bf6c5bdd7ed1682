"""jax_it: LoRA instruction tuning of Gemma in JAX."""
