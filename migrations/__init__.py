"""The node's schema as numbered SQL files, applied by `nodes.migrate` (shipped in the wheel)."""
