"""Names of the kinds of cache a model keeps, shared by the models (which declare theirs) and the KV-transfer
layout (which moves and checks them); plain strings, so the router can read a layout without torch."""
PAGED_KV = "paged_kv"  # two planes per layer: K and V
PAGED_LATENT = "paged_latent"  # one plane per layer: MLA's compressed latent and roped shared key
PLANES = {PAGED_KV: 2, PAGED_LATENT: 1}  # the paged kinds a transport can move
RECURRENT_STATE = "recurrent_state"  # a per-sequence (not paged) state, e.g. gated DeltaNet's
