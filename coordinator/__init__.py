"""Runs the study: rounds, sums, pooled evaluation, the Flower ServerApp, the CLI."""
