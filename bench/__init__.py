"""projector's benchmark harness (issue 11): one command, ``python -m bench.run``, that runs a
workload against the real services and prints projector's figures beside the limits of the
machine. See bench/README.md."""
