"""Versioned publishing of adapter weights through the Ray object store."""
