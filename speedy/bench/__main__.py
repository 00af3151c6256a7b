"""`python -m speedy.bench ...`: the benchmark."""
import sys

from speedy.bench.runner import main

sys.exit(main())
