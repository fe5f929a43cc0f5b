"""Kafka topics and how events are written to the outbox.

One topic per aggregate, keyed by the aggregate id so order holds per key; several partitions
so consumers scale out in a group. Each record carries headers event_type (the protobuf full
name of the value), event_id (consumers drop duplicates by it), request_id and, inside a trace,
traceparent."""

from __future__ import annotations

import json
from dataclasses import dataclass

from google.protobuf.message import Message
from psycopg import AsyncConnection

from common import tracing
from common.ids import new_id
from common.logging import request_id_var

CUSTOMER_TOPIC = "bank.customer.v1"
TRANSFER_TOPIC = "bank.transfer.v1"
DLQ_SUFFIX = ".dlq"


def dlq_topic(topic: str) -> str:
    """Where consumers park a record of topic that can never be handled (see common/consumer.py)."""
    return topic + DLQ_SUFFIX


# topic -> partitions. Created by the outbox relay and the consumers at start (auto-creation is
# off). A dead-letter topic has one partition: it is small, and read in full by common/dlq.py.
TOPICS = {CUSTOMER_TOPIC: 6, TRANSFER_TOPIC: 6, dlq_topic(CUSTOMER_TOPIC): 1, dlq_topic(TRANSFER_TOPIC): 1}


@dataclass(frozen=True)
class OutboxEvent:
    topic: str
    aggregate_id: str
    message: Message  # a bank.events.v1 message whose event_id field is set

    @property
    def event_type(self) -> str:
        return str(self.message.DESCRIPTOR.full_name)


def event_headers() -> dict[str, str]:
    """The Kafka headers of an event written now: the request id, and the request's trace
    context (W3C traceparent) so that the consumer's span joins its trace."""
    return {"request_id": request_id_var.get(), **tracing.headers()}


async def append(conn: AsyncConnection, event: OutboxEvent) -> None:
    """Write the event to this schema's outbox in the caller's transaction; the relay publishes
    it after commit (NOTIFY is delivered only at commit, so it never announces a rolled-back row)."""
    event_id = getattr(event.message, "event_id", "") or new_id()
    await conn.execute(
        "INSERT INTO outbox (event_id, topic, aggregate_id, event_type, payload, headers)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (event_id, event.topic, event.aggregate_id, event.event_type, event.message.SerializeToString(),
         json.dumps(event_headers())),
    )
    await conn.execute("SELECT pg_notify('outbox_' || current_schema(), '')")
