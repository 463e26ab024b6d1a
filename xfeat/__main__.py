"""``python -m xfeat`` runs the command line (also what ``torchrun -m xfeat`` needs)."""

import sys

from xfeat_cli.main import main

sys.exit(main())
