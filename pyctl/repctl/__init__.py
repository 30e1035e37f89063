"""repctl: control plane of the dm-repl block replication target."""

__version__ = "0.1.0"
