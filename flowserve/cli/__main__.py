"""``python -m flowserve.cli``: the ``flowserve`` command."""

import sys

from flowserve.cli import main

sys.exit(main())
