"""Benchmarks (not tests): vislens against a plain forward, nnsight and TransformerLens."""
