"""Evaluation: attack suites, judges, and held-out-by-source reports."""
