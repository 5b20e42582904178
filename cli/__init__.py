"""Thin click commands for driftmerge (installed as ``driftmerge_cli``)."""
