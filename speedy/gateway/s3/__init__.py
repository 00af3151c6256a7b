"""The S3 REST API on the gateway: SigV4 auth, aws-chunked bodies, XML documents."""
