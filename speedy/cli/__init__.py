"""The `speedy` command (put/get/rm/stat/status/admin/local/bench) over speedy.client."""
from speedy.cli.main import main

__all__ = ["main"]
