"""Peer (third-party) pruning baselines for the benchmarks; optional deps in benchmarks/requirements.txt."""
