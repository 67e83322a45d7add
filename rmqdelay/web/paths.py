"""Path convertors the HTTP API and the dashboard share, registered on import."""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor


class AnyText(Convertor[str]):
    """A path segment of any text: a key may hold '/', newlines and any Unicode, and
    Starlette's own ``path`` convertor stops at a newline."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class AsideName(Convertor[str]):
    """``parked`` or ``unroutable``: the two queues of messages set aside."""

    regex = "parked|unroutable"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anything", AnyText())
register_url_convertor("aside", AsideName())
