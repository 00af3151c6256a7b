"""The HTTP gateway: blobs by key, the original front end's path API, metadata database."""
