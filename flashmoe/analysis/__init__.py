"""Tools that study routing rather than run the model: traces recorded from a real model and
replayed into the bench (routing_trace), their locality statistics and generators (locality)."""
