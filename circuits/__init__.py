"""circuits package (see the README)."""
