"""`python -m tunekit ...` and `accelerate launch -m tunekit train CONFIG`."""

import sys

from tunekit.cli import main

sys.exit(main())
