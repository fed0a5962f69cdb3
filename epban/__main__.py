import sys

from epban.cli import main

sys.exit(main())
