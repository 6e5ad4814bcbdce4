"""``python -m pyrep.tools.img``: the same as the ``pyrep-img`` console script."""
import sys

from .cli import main

sys.exit(main())
