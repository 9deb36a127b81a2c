"""`python -m alexnet2gpu` is the `alexnet2gpu` command."""

import sys

from .cli import main

sys.exit(main())
