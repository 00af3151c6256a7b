"""`python -m speedy.chunkserver ...`: the chunkserver (as spy_server)."""
from speedy.chunkserver.supervisor import main

main()
