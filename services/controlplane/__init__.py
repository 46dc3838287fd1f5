"""The HuViDPO control plane: REST API over the object store and an executor of trainer Jobs."""
