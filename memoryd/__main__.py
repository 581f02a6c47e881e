"""`python -m memoryd ...` is the same as the `memoryd` console script."""

import sys

from memoryd.cli.main import main

sys.exit(main())
