"""fastopt's benchmarks: `python -m bench --help`."""
