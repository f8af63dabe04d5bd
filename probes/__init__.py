"""probes package (see the README)."""
