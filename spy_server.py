#!/usr/bin/env python3
"""spy_server: the speedy chunkserver (see README.md and speedy/supervisor.py)."""
from speedy.supervisor import main

if __name__ == "__main__":
    main()
