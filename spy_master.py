#!/usr/bin/env python3
"""spy_master: the speedy chunkmaster (group registry, heartbeats and fids in SQLite)."""
import sys

from speedy.master.daemon import main

if __name__ == "__main__":
    sys.exit(main())
