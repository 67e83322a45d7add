"""The dashboard ``rmqdelay serve`` serves at ``/``: pages a person reads and acts on, beside
the HTTP API, rendered on the server (docs/design.md, "The dashboard", says why)."""
