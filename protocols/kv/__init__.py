"""A decoder's KV cache on secret shares: KV-stationary products, oblivious selection of the
kept tokens, and private greedy generation with pruning policies."""
