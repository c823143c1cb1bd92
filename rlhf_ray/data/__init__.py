"""Prompt datasets, the held-out split and the prompt cursor; preference pairs for DPO/IPO."""
