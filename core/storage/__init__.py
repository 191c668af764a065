"""Storage: bytes in and out (local folder or S3), artifacts and their manifest, deletion."""
