"""Shared by the daemons and tools: config, daemonize, logs, notify, metrics."""
