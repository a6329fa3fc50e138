"""Heads: raw per-level predictions; targets, losses and post-processing live beside them, apart."""
