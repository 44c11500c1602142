"""``python -m bitmar_browser --store DIR``: the memory browser (see ``cli.main``)."""
import sys

from .cli import main

sys.exit(main())
