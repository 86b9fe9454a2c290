"""The control plane, torch-free: the wire protocol, the worker runtime (sockets, heartbeats, the poll/step loop)
and the worker command line."""
