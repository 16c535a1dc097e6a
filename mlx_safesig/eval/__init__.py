"""Evaluation (SPEC §6): attack suites run with safety on and off, judged several ways, written as
JSON, a Markdown report and plots. ``suites`` plans the generations, ``harness`` runs them,
``judges`` says who refused, ``report`` aggregates and writes the results; ``detection`` counts the
query verdict per held-out source, ``utility`` measures what safety costs benign answers."""

from .harness import EvalSettings, run_eval

__all__ = ["EvalSettings", "run_eval"]
