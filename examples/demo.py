"""The demo lives in the package (``etcdcron/demo.py``) so an installed etcdcron can run it too
(``etcdcron demo``); this script runs it from a checkout: ``python examples/demo.py``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from etcdcron.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
