"""A Django Channels process for the interop tests: one channels_rabbitmq layer, driven
over stdin/stdout by crates/chanlayer-amqp/tests/channels_rabbitmq.rs.

One JSON command per line in, one JSON answer per line out:

    {"op": "new_channel"}                              -> {"channel": "channels_...!..."}
    {"op": "queue"}                                    -> {"queue": "channels_..."}
    {"op": "send", "channel": C, "message": {...}}     -> {"ok": true} | {"error": "ChannelFull"}
    {"op": "send_until_full", "channel": C, "message": {...}, "max": N}
                                                       -> {"sent": n, "full": true|false}
    {"op": "receive", "channel": C, "timeout": S}      -> {"message": {...}} | {"timeout": true}
    {"op": "group_add" | "group_discard", "group": G, "channel": C} -> {"ok": true}
    {"op": "group_send", "group": G, "message": {...}} -> {"ok": true}
    {"op": "publish_raw", "routing_key": Q, "hex": H}  -> {"ok": true}  (bytes, no layer)
    {"op": "close"}                                    -> {"ok": true}, then exits

The layer's settings come from the environment: PEER_AMQP_URL, PEER_GROUPS_EXCHANGE
(default "groups"), PEER_EXPIRY (seconds, default 60), PEER_REMOTE_CAPACITY (default 100),
PEER_LOCAL_CAPACITY (default 100). Messages are JSON objects here and MessagePack dicts on
the wire (channels_rabbitmq's own encoding).
"""

import asyncio
import json
import os
import sys

from channels.exceptions import ChannelFull
from channels_rabbitmq.core import RabbitmqChannelLayer


def env(name, default, kind=str):
    value = os.environ.get(name)
    return default if value is None else kind(value)


async def handle(layer, cmd):
    op = cmd["op"]
    if op == "new_channel":
        return {"channel": await layer.new_channel()}
    if op == "queue":
        await layer.carehare_connection  # connected: the queue exists
        return {"queue": layer._queue_name}
    if op == "send":
        try:
            await layer.send(cmd["channel"], cmd["message"])
        except ChannelFull:
            return {"error": "ChannelFull"}
        return {"ok": True}
    if op == "send_until_full":
        for n in range(cmd["max"]):
            try:
                await layer.send(cmd["channel"], dict(cmd["message"], n=n))
            except ChannelFull:
                return {"sent": n, "full": True}
        return {"sent": cmd["max"], "full": False}
    if op == "receive":
        try:
            message = await asyncio.wait_for(layer.receive(cmd["channel"]), cmd["timeout"])
        except asyncio.TimeoutError:
            return {"timeout": True}
        return {"message": message}
    if op == "group_add":
        await layer.group_add(cmd["group"], cmd["channel"])
        return {"ok": True}
    if op == "group_discard":
        await layer.group_discard(cmd["group"], cmd["channel"])
        return {"ok": True}
    if op == "group_send":
        await layer.group_send(cmd["group"], cmd["message"])
        return {"ok": True}
    if op == "publish_raw":
        connection = await layer.carehare_connection
        await connection.publish(
            bytes.fromhex(cmd["hex"]), exchange_name="", routing_key=cmd["routing_key"]
        )
        return {"ok": True}
    if op == "close":
        await layer.close()
        return {"ok": True}
    raise ValueError(f"unknown op {op!r}")


async def main():
    layer = RabbitmqChannelLayer(
        host=os.environ["PEER_AMQP_URL"],
        groups_exchange=env("PEER_GROUPS_EXCHANGE", "groups"),
        expiry=env("PEER_EXPIRY", 60, float),
        remote_capacity=env("PEER_REMOTE_CAPACITY", 100, int),
        local_capacity=env("PEER_LOCAL_CAPACITY", 100, int),
    )
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        try:
            answer = await handle(layer, cmd)
        except Exception as e:  # the test prints it with the command
            answer = {"exception": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)
        if cmd["op"] == "close":
            return
    await layer.close()


if __name__ == "__main__":
    asyncio.run(main())
