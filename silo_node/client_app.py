"""The Flower ClientApp: a thin relay to the silo's own service.

It imports only Flower, numpy and the message contract, so the process Flower starts
per message is cheap; the silo's service (see service.py) does the work. The silo
finds its service through `context.node_config["state-dir"]`.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from policies import messages as m
from policies.errors import PolicyError
from silo_node.service_socket import call

app = ClientApp()


def _relay(msg: Message, context: Context, kind: str) -> Message:
    header = dict(msg.content.config_records[m.HEADER])
    record = msg.content.array_records.get(m.ARRAYS, ArrayRecord())
    arrays = {k: v.numpy() for k, v in record.items()}
    try:
        reply, out = call(str(context.node_config["state-dir"]), kind, header, arrays)
    except (PolicyError, OSError, KeyError) as exc:
        req = m.Request.model_validate(header)
        reply = m.refusal(req, str(context.node_config.get("silo-name", "unknown")), str(exc)).model_dump()
        out = {}
    content = RecordDict({
        m.HEADER: ConfigRecord({k: v for k, v in reply.items() if v is not None}),  # Flower has no null
        m.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()}),
    })
    return Message(content, reply_to=msg)


def _relay_to_service(kind: str):
    """One Flower handler per message type, all relaying to the silo's service."""
    def handler(msg: Message, context: Context) -> Message:
        return _relay(msg, context, kind)
    return handler


for _kind in (m.ENROL, m.KEYGEN, m.KEYSHARE, m.KEYRECV, m.STATS, m.REVEAL, m.CLOSE, m.RELEASE):
    app.query(_kind.removeprefix("query."))(_relay_to_service(_kind))


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _relay(msg, context, m.TRAIN)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _relay(msg, context, m.EVALUATE)
