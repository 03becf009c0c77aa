"""Benchmarks: each ``bench_<name>`` module measures a stage beside its baseline.

Run as ``leukoflow bench NAME`` or ``python -m leukoflow.benchmarks.bench_NAME``.
"""
