"""`python -m ekko_libvirt.cli`: the `ekko` command."""

import sys

from . import main

sys.exit(main())
