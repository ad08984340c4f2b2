"""Tensor parallelism: this process's rank in the group and the collectives the layers call."""
