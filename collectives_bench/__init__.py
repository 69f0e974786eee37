"""Collective microbenchmarks in nccl-tests units; see issue 4."""
