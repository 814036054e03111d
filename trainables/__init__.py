"""Ray entry points."""
