"""``python -m robustseg.cli``."""
import sys

from robustseg.cli import main

sys.exit(main())
