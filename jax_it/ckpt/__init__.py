"""Checkpoint formats, one module each (hf, gguf, flax, tokenizer) over families.FAMILIES.

weights.py is the public entry point; it finds the format of a path and calls its module.
"""


class CheckpointError(ValueError):
  """A checkpoint that is missing, truncated, or fits no Gemma family."""
