"""Applications on the core: the Python API, the web service, the SQL store, Ray scale-out, dedup, label issues,
multi-attribute similarity."""
