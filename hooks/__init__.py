"""The OCI hook (standard library only: it runs on every container start)."""
