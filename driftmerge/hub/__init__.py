"""The Hugging Face Hub: inputs given as ``org/name[@rev]``, pushes, and model cards (all through huggingface_hub)."""
