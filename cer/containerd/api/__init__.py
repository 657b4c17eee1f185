"""Generated protobuf and gRPC stubs for the part of containerd's API cer uses (see ../regenerate)."""
