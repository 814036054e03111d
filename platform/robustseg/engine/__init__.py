"""Training engine: losses, metrics, fit/evaluate loop, inference, post-processing."""
