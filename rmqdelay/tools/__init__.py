"""The ``rmqdelay`` command and the operator tools around it (status, parking, destroy)."""
