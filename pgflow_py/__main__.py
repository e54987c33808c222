"""``python -m pgflow_py worker ...``: the same as the ``pgflow`` command."""

from .cli import main

main(prog_name="pgflow")
