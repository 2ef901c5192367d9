"""Runs inside a hospital: cohort, features, training, the Flower ClientApp, the CLI."""
