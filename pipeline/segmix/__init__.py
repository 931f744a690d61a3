"""Seg-Mix: composing characters onto one canvas (compose) and the reproducible bank of composites (bank)."""
