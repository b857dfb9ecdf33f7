"""``python -m sparse_adv_fast ...``: the ``sparse-adv-fast`` command line."""

import sys

from .cli import main

sys.exit(main())
