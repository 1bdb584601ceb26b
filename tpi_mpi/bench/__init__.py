"""Benchmarks: timed runs that print a table and append JSON lines; never imported by the runtime.
generate.py: `bench generate`; serve.py (with serve_client.py, serve_probe.py): `bench serve`, a
client of a running server; memory.py: `bench memory` and the transformers baseline; comm.py:
`bench comm`; plot.py: the allreduce figure; record.py: commit and host of a JSON line; cli.py: the commands."""
