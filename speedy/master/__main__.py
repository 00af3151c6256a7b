"""`python -m speedy.master ...`: the chunkmaster (as spy_master)."""
import sys

from speedy.master.daemon import main

sys.exit(main())
