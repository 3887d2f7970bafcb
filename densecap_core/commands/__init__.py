"""Subcommands of the ``densecap`` CLI (see ``densecap_core.cli``)."""
