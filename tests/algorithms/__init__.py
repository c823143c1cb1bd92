"""Tests for rlhf_ray.algorithms (CPU only, exact values from shared/CASES.md)."""
