"""Entropy-control and monitoring callbacks (each a `lit_entropy.Regularizer` or a plain Lightning Callback)."""
