#!/usr/bin/env python3
"""spy_gateway: the speedy HTTP gateway (the same as `speedy gateway`)."""
import sys

from speedy.gateway.daemon import main

if __name__ == "__main__":
    sys.exit(main())
