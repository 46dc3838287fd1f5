"""HuViDPO: first-frame-conditioned video diffusion aligned to human preferences with video DPO."""

__version__ = "0.1.0"
