"""`python -m nodes ...` is the operator console."""

import sys

from nodes.cli import main

sys.exit(main())
