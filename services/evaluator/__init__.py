"""The evaluation Job's entrypoint (``python -m services.evaluator``): see ``entry``."""
