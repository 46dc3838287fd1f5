"""The whole HuViDPO loop end to end: ``python -m demo`` (``make demo``) and the helpers tests/e2e reuse."""
