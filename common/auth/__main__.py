"""python -m common.auth keys|rotate|retire: the operator's key rotation (common/auth/keys.py)."""

import sys

from common.auth.keys import main

sys.exit(main())
