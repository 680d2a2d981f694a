"""``python -m flopmatch ...`` (e.g. ``torchrun -m flopmatch train ...``): the same as the ``flopmatch`` command."""

from flopmatch.cli import entry

entry()
