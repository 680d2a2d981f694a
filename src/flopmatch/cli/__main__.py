"""``python -m flopmatch.cli ...`` (e.g. under torchrun): the same as the ``flopmatch`` command."""

import sys

from flopmatch.cli import main

sys.exit(main())
