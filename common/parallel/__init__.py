"""Tensor and expert parallelism: group state (state), wire structs (wire), rank 0's launcher (ranks) and the
other ranks' entry point (follower)."""
