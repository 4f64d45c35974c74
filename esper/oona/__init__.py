"""Oona, the message bus: topics as retained logs with dense offsets, offset subscriptions,
consumer groups with acks and redelivery after a visibility timeout, topic listing.

Backends (`open_backend(url)`): ``memory://`` (default; bounded retention per topic, lost on
restart) and ``redis://host:port/db`` (Redis Streams). Both pass one contract test suite
(tests/oona/test_contract.py). `OonaBus` adds validation and the subscription semantics; its
docstring states the slow-subscriber policy. No grpc here: services/oona is the thin servicer.
"""

from esper.oona.backend import DEFAULT_RETENTION, OonaBackend
from esper.oona.backend_url import open_backend
from esper.oona.bus import GroupOptions, GroupSubscription, OffsetSubscription, OonaBus
from esper.oona.memory import InMemoryBackend
from esper.oona.model import Message, OutgoingMessage, PublishResult, StartPosition, TopicInfo

__all__ = [
    "DEFAULT_RETENTION",
    "GroupOptions",
    "GroupSubscription",
    "InMemoryBackend",
    "Message",
    "OffsetSubscription",
    "OonaBackend",
    "OonaBus",
    "OutgoingMessage",
    "PublishResult",
    "StartPosition",
    "TopicInfo",
    "open_backend",
]
