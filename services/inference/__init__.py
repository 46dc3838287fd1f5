"""The gRPC inference service: first-frame-conditioned video generation with streamed progress,
dynamic batching, several LoRA checkpoints over one base model, and rollouts followed from the store.

Layers (KServe-style): ``servicer`` is the thin gRPC transport; ``batcher`` queues requests and runs
compatible ones in one UNet batch on a single model thread; ``manager.ModelManager`` owns loading,
verification, hot swap and canary routing; ``huvidpo.pipeline`` does the generation.
"""
