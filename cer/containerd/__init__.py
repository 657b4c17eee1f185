"""containerd as a source of checkpoints and root filesystems: a gRPC client and what cer builds on it."""
