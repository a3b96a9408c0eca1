"""longrl: long-document reasoning RL (QwenLong-L1) — the engine package."""
__version__ = "0.1.0"
