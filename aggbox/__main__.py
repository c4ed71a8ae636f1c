import sys

from aggbox.cli import main

sys.exit(main())
