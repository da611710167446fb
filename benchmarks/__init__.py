"""Benchmarks (not tests): speed and peak memory of conversion, each method in a fresh interpreter."""
