"""Synthetic models and adapters for the demo, the tests and the benchmarks. The library never imports it.
"""
