import sys

from reopold.cli import main

sys.exit(main())
