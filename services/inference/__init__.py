"""The gRPC inference service: first-frame-conditioned video generation with streamed progress,
dynamic batching, several LoRA checkpoints over one base model, and rollouts followed from the store.

Layers (KServe-style): ``servicer`` is the thin gRPC transport; ``batcher`` queues requests and runs
compatible ones in one UNet batch on a single model thread; ``manager.ModelManager`` owns loading,
verification, hot swap and canary routing, through ``fetch`` (download and verify into the cache),
``routing`` (pure: which model serves a request, which role each model holds) and ``follow`` (polls
the rollout record); ``huvidpo.pipeline`` does the generation.

Run: ``python -m services.inference`` with ``HUVIDPO_STORE_*`` and ``HUVIDPO_INFERENCE_*`` set (see
``services.common.settings.InferenceSettings``). It answers health checks at once (NOT_SERVING, and
UNAVAILABLE to Generate) and turns SERVING once the base model is loaded and the rollout record read.
Try it with grpcurl: ``grpcurl -plaintext 127.0.0.1:50051 list`` (server reflection is on).
Videos over ``inline_limit_bytes`` go to ``generations/{deployment}/{request_id}.{ext}`` in the store
and come back as a presigned URL valid for ``url_ttl_seconds``.
"""
