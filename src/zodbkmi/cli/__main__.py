"""``python -m zodbkmi.cli``."""
import sys

from zodbkmi.cli import main

sys.exit(main())
