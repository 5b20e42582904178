"""One module per command, each joining the layers below into a job; their options come from
:mod:`driftmerge.commands.options` (also the source of the CLI's flags and the recipes' keys)."""
