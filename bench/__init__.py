"""Benchmark suite of mcp-imagegen: `python -m bench` (see bench/README.md)."""
