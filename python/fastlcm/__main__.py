"""`python -m fastlcm …` (and `accelerate launch -m fastlcm …`) runs the CLI."""

import sys

from fastlcm.cli import main

sys.exit(main())
