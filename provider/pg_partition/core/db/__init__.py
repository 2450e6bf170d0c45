"""Database plumbing every workflow shares: catalog introspection, the logged and dry-runnable executor (with
``lock_timeout`` and bounded retries), the resumable state schema, period/bound/name arithmetic, partition
creation and attachment, what the connected server version can do, and the project's errors."""
