"""Launching nano-pd clusters: local process supervision and cluster specs."""
