"""CLI commands that live in modules of their own, each registered in `orchestrator.cli`."""
