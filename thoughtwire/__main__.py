import sys

from thoughtwire.cli import main

sys.exit(main())
