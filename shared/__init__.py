"""What frontends and workers both import: the bus, keys, protocol, settings and vocabularies."""
