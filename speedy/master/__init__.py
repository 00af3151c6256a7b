"""The chunkmaster (spy_master): daemon, WSGI app, SQLite database, health monitor."""
