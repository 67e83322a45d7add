"""The broker layer: connect, declare, publish (``Publisher``), schedule, follow cancels."""
