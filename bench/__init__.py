"""Benchmarks: continual-learning protocols and speed measurements on the product's own code."""
