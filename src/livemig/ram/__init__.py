"""RAM helpers: page runs and digests."""
