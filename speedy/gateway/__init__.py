"""The HTTP gateway: blobs for browsers, CDNs and curl, and the original front end's API."""
