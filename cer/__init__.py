"""CER-Manager: keeps pools of ready Linux namespaces for restoring containers from CRIU checkpoints."""

__version__ = "0.1.0"
