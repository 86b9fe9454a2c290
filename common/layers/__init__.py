"""Building blocks of the models: paged attention, rotary, norms, tensor-parallel linears and embeddings, MoE."""
