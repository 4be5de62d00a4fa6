"""regcache storage: content-addressed blobs, metadata, lifecycle. Knows nothing of HTTP."""
