"""``python -m driftmerge …``: the console script, as ``torchrun -m driftmerge extract …`` launches it."""

from driftmerge_cli.main import entry

if __name__ == "__main__":
    entry()
