"""Codecs: zstd framing, DeMo DCT + top-k, index and value coding, error feedback. Pure functions."""
