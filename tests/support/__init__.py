"""Harnesses shared by the tests: tiny models, the transformers reference, local clusters."""
