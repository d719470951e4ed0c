import sys

from splitvl.cli import main

sys.exit(main())
