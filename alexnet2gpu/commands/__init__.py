"""One module per `alexnet2gpu` sub-command: ``add_arguments(parser)`` and ``run(args)``."""
