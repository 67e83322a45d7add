import sys

from rmqdelay.cli import main

sys.exit(main())
