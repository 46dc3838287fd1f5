"""Generated gRPC stubs of protos/huvidpo/v1 (see services/inference/protogen.py)."""
