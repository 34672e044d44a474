"""Local development helpers: the embedded PostgreSQL server and the demo run."""
