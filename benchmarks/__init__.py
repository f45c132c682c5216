"""shmarray's benchmarks: ``python -m benchmarks`` measures every performance claim against its peers.

See benchmarks/README.md for the groups, the harness and how to read the results.
"""
