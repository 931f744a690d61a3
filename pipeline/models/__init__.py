"""Model presets, model loading and the locally built tiny models."""
