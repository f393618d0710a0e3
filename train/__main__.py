"""`python -m train`: the same as `microbert-train`."""

import sys

from train.main import main

sys.exit(main())
