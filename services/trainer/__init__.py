"""The trainer Job's entrypoint: ``python -m services.trainer`` (see ``entry``)."""
