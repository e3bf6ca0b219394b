"""``python -m pyterrier_kdcl experiment CONFIG [--out DIR]``: the ``kdcl`` command without the console script."""

import sys

from pyterrier_kdcl.experiment.cli import main

sys.exit(main())
