"""Benchmarks: regcache beside the distribution registry and nginx, measured in one run."""
