"""``python -m pyrep.tools.io``: the same as the ``pyrep-io`` console script."""
import sys

from .cli import main

sys.exit(main())
