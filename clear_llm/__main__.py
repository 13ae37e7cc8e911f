"""``python -m clear_llm``: the same as the ``clear-llm`` console script."""

import sys

from clear_llm.cli import main

sys.exit(main())
