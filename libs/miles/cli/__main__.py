"""`python -m miles.cli`: what `miles run` starts each service with."""

import sys

from miles.cli.main import main

sys.exit(main())
