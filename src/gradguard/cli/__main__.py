"""``python -m gradguard.cli``: the same as the ``gradguard`` command."""
import sys

from . import main

sys.exit(main())
