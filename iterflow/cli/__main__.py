import sys

from iterflow.cli.app import main

sys.exit(main())
