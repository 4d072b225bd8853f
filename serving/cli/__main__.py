"""`python -m serving.cli`: the `tierserve` command."""

import sys

from serving.cli import main

sys.exit(main())
