"""Benchmarks of the whole pipeline (`python -m bench.pipeline`); not shipped with the gateway.

Research use only; not a medical device.
"""
