"""`python -m open360.analysis.memorization run=<run> ...`: the checkpoints x chunks memorization job."""

import sys

from open360.analysis.memorization.job import main

sys.exit(main())
