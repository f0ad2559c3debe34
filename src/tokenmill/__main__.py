"""`python -m tokenmill ...` is `tokenmill ...`."""

import sys

from tokenmill.cli import main

sys.exit(main())
