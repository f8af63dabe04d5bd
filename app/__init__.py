"""app package (see the README)."""
