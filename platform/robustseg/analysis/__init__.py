"""Analysis: robustness, clinical indices, representation similarity, pseudo labels."""
