"""``python -m depthprune``: the same CLI as the ``depthprune`` command."""

import sys

from .cli import main

sys.exit(main())
