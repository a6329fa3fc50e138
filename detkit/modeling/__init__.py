"""Model parts: backbones, necks, heads, anchors, matching, detectors."""
