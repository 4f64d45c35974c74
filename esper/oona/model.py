"""Oona's domain objects and the validation shared by every backend (no grpc here)."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from esper.errors import InvalidArgumentError, quoted

# Topic, group and consumer names become Redis key parts and log fields, so keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
_IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_TOPIC_NAME_LENGTH = 249
MAX_MEMBER_NAME_LENGTH = 128


class StartPosition(enum.IntEnum):
    """Where an offset subscription (or a newly created consumer group) starts reading."""

    LATEST = 1
    EARLIEST = 2
    OFFSET = 3


@dataclass(frozen=True)
class OutgoingMessage:
    """What a publisher hands the bus; the bus assigns id, offset and publish time."""

    payload: bytes
    key: str = ""
    content_type: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    # Optional: a repeat with the same key on the same topic, while the first is retained,
    # returns the first one's offset instead of storing a copy (safe retries of Publish).
    idempotency_key: str = ""


@dataclass(frozen=True)
class Message:
    """A message as stored and delivered. `message_id` is the decimal offset on every backend."""

    topic: str
    offset: int
    payload: bytes
    key: str
    content_type: str
    headers: dict[str, str]
    source: str
    publish_time: float
    delivery_attempt: int = 1

    @property
    def message_id(self) -> str:
        return str(self.offset)


@dataclass(frozen=True)
class PublishResult:
    message_id: str
    offset: int


@dataclass(frozen=True)
class TopicInfo:
    """A topic's retained window: offsets [first_offset, next_offset) minus nothing (dense)."""

    name: str
    first_offset: int
    next_offset: int
    retained_messages: int
    consumer_groups: tuple[str, ...] = ()
    # Per consumer group: messages not yet delivered to it (lag) and delivered but unacked (pending).
    group_lag: Mapping[str, int] = field(default_factory=dict)
    group_pending: Mapping[str, int] = field(default_factory=dict)


def validate_name(value: str, what: str, field_name: str, max_length: int) -> str:
    """Return `value` if it is a valid topic/group/consumer name, else raise InvalidArgumentError."""
    if not value:
        raise InvalidArgumentError(f"{field_name} is empty; expected a {what} name such as 'esper.telemetry'",
                                   field=field_name)
    if len(value) > max_length:
        raise InvalidArgumentError(f"{field_name} is {len(value)} characters long; a {what} name has at most "
                                   f"{max_length}", field=field_name)
    if not _NAME_RE.match(value):
        raise InvalidArgumentError(
            f"{field_name} {quoted(value)} is not a valid {what} name; expected letters, digits, '.', '_' or '-', "
            "starting with a letter or digit", field=field_name)
    return value


def validate_topic(topic: str, field_name: str = "topic") -> str:
    """Validate a topic name (letters, digits, '.', '_', '-'; at most 249 characters)."""
    return validate_name(topic, "topic", field_name, MAX_TOPIC_NAME_LENGTH)


def validate_idempotency_key(key: str, field_name: str = "idempotency_key") -> str:
    """Empty (no deduplication) or 1-128 characters of letters, digits and ``._:-``."""
    if key and not _IDEMPOTENCY_KEY_RE.match(key):
        raise InvalidArgumentError(f"{field_name} {quoted(key)} must be 1-128 characters of letters, digits and "
                                   "._:- (or empty for no deduplication)", field=field_name)
    return key


def parse_message_id(message_id: str, field_name: str) -> int:
    """A message id is the decimal offset; anything else is an InvalidArgumentError naming the field."""
    if not message_id.isascii() or not message_id.isdigit() or len(message_id) > 19:
        raise InvalidArgumentError(
            f"{field_name} {quoted(message_id)} is not a message id; expected the decimal offset the bus assigned",
            field=field_name)
    return int(message_id)
