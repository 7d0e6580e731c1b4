"""``python -m thoughtwire``: the command line."""

import sys

from thoughtwire.cli import main

sys.exit(main())
