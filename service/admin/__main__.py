"""`python -m service.admin`: the same as `refund-admin`."""

import sys

from service.admin.cli import main

sys.exit(main())
