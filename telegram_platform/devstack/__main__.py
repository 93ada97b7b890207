"""`python -m telegram_platform.devstack COMMAND`: see cli.py."""

import sys

from .cli import main

sys.exit(main())
