"""The lease store: the one source of truth."""
