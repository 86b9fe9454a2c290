"""The decode role: admission with block reservation, continuous batched decoding, token streaming."""
