"""Prompt datasets, the held-out split and the prompt cursor."""
