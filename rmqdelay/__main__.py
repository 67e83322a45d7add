import sys

from rmqdelay.cli.main import main

sys.exit(main())
