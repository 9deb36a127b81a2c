"""The ``alexnet2gpu`` command: :mod:`.main` parses and dispatches, :mod:`.arguments`
holds the shared flags, and each sub-command is one module here (``add_arguments(parser)``
and ``run(args) -> int``)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
