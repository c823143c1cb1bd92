"""Models: builtin models, loading with LoRA, the value head and the padded forward pass."""
