"""Necks: turn backbone features into a feature pyramid."""
