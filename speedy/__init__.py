"""speedy: a distributed blob store (chunkserver, chunkmaster, client)."""

__version__ = "0.1.0"
