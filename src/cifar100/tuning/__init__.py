"""Hyperparameter search with Optuna, and what a study has found."""
