"""The command line: `rmqdelay` and its subcommands (main.py parses and dispatches)."""
