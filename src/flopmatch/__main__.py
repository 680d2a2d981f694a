"""``python -m flopmatch ...`` (e.g. ``torchrun -m flopmatch train ...``): the same as the ``flopmatch`` command."""

import sys

from flopmatch.cli import main

sys.exit(main())
