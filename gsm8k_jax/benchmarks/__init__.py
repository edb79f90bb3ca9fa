"""Benchmark-only code, apart from the library: random configs, the
transformers reference, the GSM8K-shaped workload and the memory roofline.
`research/script/benchmark_sampler.py` runs them."""
