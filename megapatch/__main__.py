import sys

from megapatch.cli import main

sys.exit(main())
