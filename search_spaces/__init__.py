"""Optuna search spaces."""
