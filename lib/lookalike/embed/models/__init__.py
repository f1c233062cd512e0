"""Embedding models: the registry, weights, devices, the vision and text embedders, the per-worker cache."""
