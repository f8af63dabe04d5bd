"""spectral package (see the README)."""
