"""Frontends: hold clients' sockets and streams, queue prompts and relay events (``thoughtwire api``)."""
