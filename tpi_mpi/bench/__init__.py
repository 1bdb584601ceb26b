"""Benchmarks: timed runs that print a table and append JSON lines; never imported by the runtime
or the tests. generate.py: `bench generate` and `bench serve`; memory.py: `bench memory` and the
transformers baseline; comm.py: `bench comm`; plot.py: the allreduce figure; cli.py: the commands."""
