import sys

from rmqdelay.tools.cli import main

sys.exit(main())
