"""splitvl: serve Qwen3-VL-MoE with the vision encoder split from the language model.

This package holds only the `splitvl` console script; the work lives in models/, transfer/,
encode_server/ and language_server/.
"""
