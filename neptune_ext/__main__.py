"""`python -m neptune_ext ...` is the `neptune` command (also under torchrun)."""
import sys

from .cli import main

sys.exit(main())
