"""Stitch: shape planning, adapters, the stitched module (prefix -> adapters -> suffix) and its cost."""
