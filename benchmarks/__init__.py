"""Throughput benchmarks: each compares a stage against its baseline side by side in one run and prints JSON."""
