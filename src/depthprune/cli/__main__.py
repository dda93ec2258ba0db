"""``python -m depthprune.cli``: the same CLI as the ``depthprune`` command."""

import sys

from . import main

sys.exit(main())
