"""`python -m speedy ...`: the speedy command line (see speedy.cli)."""
import sys

from speedy.cli import main

if __name__ == "__main__":
    sys.exit(main())
