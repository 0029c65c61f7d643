"""python -m tasktree."""

import sys

from tasktree.cli import main

sys.exit(main())
