"""`python -m bridge` is the same as the `orthanc-bridge` command."""

import sys

from bridge.cli import main

sys.exit(main())
