"""Alignment evaluation: metrics of agreement with humans, bias, drift and quality; scorers; batch
generation with Ray Data; `raylign eval` and `raylign report` (markdown + PNG plots).

`metrics` is pure numpy/scipy; `scorers` loads models on first use; `generate` needs Ray.
"""
