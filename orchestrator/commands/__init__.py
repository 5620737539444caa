"""Groups of `orch` subcommands that live outside `orchestrator.cli` (which registers them)."""
