"""Backbones: feature extractors returning named multi-scale features."""
