"""The writer's chunk store: chunk files, data dir, recovery, delete journal, snapshot."""
