"""Fake quantization of llama.cpp's ffn_norm output, measured: build → model → run → metrics → verdicts → report."""
