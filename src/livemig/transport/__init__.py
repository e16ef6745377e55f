"""Channels between source and destination: addresses, sockets, rate limiting."""
