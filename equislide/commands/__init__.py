"""Subcommands of the equislide CLI, one module each."""
