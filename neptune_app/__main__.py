"""`python -m neptune_app ...` is the `neptune` command (also under torchrun)."""
import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker whose work is done and written: leave without the interpreter's
    # finalization, where a communication library's threads torn down late can abort the
    # process and turn a finished run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
