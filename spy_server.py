#!/usr/bin/env python3
"""spy_server: the speedy chunkserver (see README.md and speedy/chunkserver/supervisor.py)."""
from speedy.chunkserver.supervisor import main

if __name__ == "__main__":
    main()
