"""`python -m fairport ...` (and `torchrun ... -m fairport verify ...`): the command line."""

import sys

from fairport.cli import main

sys.exit(main())
