"""The Flower ClientApp: decode a request, let the silo's worker answer, encode the reply.

Each silo finds its own cohort, study policy and name in `context.node_config`
(`flower-supernode --node-config 'silo-name="x" cohort-path="..." study-path="..."'`).
Errors become refusals with a reason (no row or value is ever put in a reason).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from policies import messages as m
from policies.errors import PolicyError
from policies.study import load_study
from silo_node.worker import Silo, refusal

app = ClientApp()


def _silo(context: Context) -> Silo:
    cfg = context.node_config
    return Silo.from_cohort(str(cfg["silo-name"]), load_study(str(cfg["study-path"])), str(cfg["cohort-path"]))


def _decode(msg: Message) -> tuple[m.Request, dict[str, np.ndarray]]:
    header = m.Request.model_validate(dict(msg.content.config_records[m.HEADER]))
    record = msg.content.array_records.get(m.ARRAYS, ArrayRecord())
    return header, {k: v.numpy() for k, v in record.items()}


def _encode(msg: Message, reply: m.Reply, arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict({
        m.HEADER: ConfigRecord(reply.model_dump()),
        m.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float64)) for k, v in arrays.items()}),
    })
    return Message(content, reply_to=msg)


def _handle(msg: Message, context: Context, work) -> Message:
    req, arrays = _decode(msg)
    name = str(context.node_config.get("silo-name", "unknown"))
    try:
        silo = _silo(context)
        silo.check(req)
        reply_arrays, counts = work(silo, req, arrays)
        return _encode(msg, silo.reply(req, counts), reply_arrays)
    except PolicyError as exc:
        return _encode(msg, refusal(req, name, str(exc)), {})


def _stats(silo: Silo, req: m.Request, arrays: dict) -> tuple[dict, None]:
    return {m.MOMENTS: silo.stats_contribution()}, None


def _train(silo: Silo, req: m.Request, arrays: dict) -> tuple[dict, np.ndarray]:
    update, counts = silo.train(req.round, arrays.get(m.STATS_SUM), m.aggregates_from_arrays(arrays))
    return {m.UPDATE: update, m.EVAL: counts}, counts


def _evaluate(silo: Silo, req: m.Request, arrays: dict) -> tuple[dict, np.ndarray]:
    counts = silo.evaluate(arrays.get(m.STATS_SUM), m.aggregates_from_arrays(arrays))
    return {m.EVAL: counts}, counts


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _stats)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _evaluate)
