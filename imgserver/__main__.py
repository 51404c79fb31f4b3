"""``python -m imgserver``: the same as the ``imgserver`` command."""

from .cli import main

main()
