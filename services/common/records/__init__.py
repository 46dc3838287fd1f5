"""Records: every object that crosses a service boundary through the object store.

The control plane, the trainer and the inference service talk to each other only through the store;
this package is meant to own all of it in one place (issue 15), so that no service reads another's
private layout:

- ``keys``: every store key and id function, and the checkpoint id format ``ckpt-<finetune_id>-<step>``;
- ``exit_codes``: the trainer's exit codes, read by the local supervisor and the Job's podFailurePolicy;
- ``listing``: the published checkpoints of a fine-tune (one implementation for every service);
- ``progress``: the trainer's progress events (``start | step | checkpoint | end``), a tagged union;
- ``lineage``: the one digest (``content_digest``), ``Lineage`` and the dataset-version and checkpoint manifests.
- ``finetune``: ``FineTuneSpec`` (written once, the trainer's only input) and ``FineTuneStatus``
  (written only by the control plane, always compare-and-swap).

Modules here import only the standard library, pydantic and the store port: the tiny supervisor
process and the control plane import them without pulling torch.
"""
