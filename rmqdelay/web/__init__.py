"""`rmqdelay serve`: the HTTP API (api.py) and the dashboard beside it (dashboard/)."""
