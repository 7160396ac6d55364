"""The chat's websocket consumer: the Rust chat's protocol (examples/chat/src/protocol.rs),
in Django Channels.

Each connection is one channel of the layer (Channels makes it: self.channel_name); a room
is the group "room.<ROOM>". A line said in a room is one group_send of

    {"type": "chat.message", "room": ..., "text": ..., "name": ..., "server": ..., "sent_ms": ...}

which is what the Rust chat sends too (its ChatMessage struct, a MessagePack map with those
keys under wire=channels_rabbitmq), so every member of the room gets it, on this server, on
another Django process or on a Rust one, through chat_message below.

Browser to server, one JSON object per text frame:
    {"join": ROOM}   {"leave": ROOM}   {"room": ROOM, "text": TEXT, "name": NAME}
Server to browser, tagged by "type": hello {server, backend}, joined {room}, left {room},
message {room, text, name, server, sent_ms}, error {error}.
"""
import json
import re
import time
import unicodedata

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

MAX_ROOM_LEN = 64
MAX_TEXT_CHARS = 2000
MAX_NAME_CHARS = 32
MAX_ROOMS = 32
GROUP_PREFIX = "room."
ROOM_NAME = re.compile(r"[A-Za-z0-9._-]{1,%d}" % MAX_ROOM_LEN)
FIELDS = {"join", "leave", "room", "text", "name"}
REQUESTS = '{"join": ROOM}, {"leave": ROOM} or {"room": ROOM, "text": TEXT}'


class BadRequest(Exception):
    """A request the browser is told it got wrong (the message is for the browser)."""


def group_of(room):
    return GROUP_PREFIX + room


def check_room(room):
    if not ROOM_NAME.fullmatch(room):
        raise BadRequest(
            f"bad room name {json.dumps(room)}: use 1 to {MAX_ROOM_LEN} ASCII letters, "
            "digits, '.', '_' or '-'"
        )
    return room


def clean_name(name):
    name = "".join(c for c in (name or "") if unicodedata.category(c) != "Cc")
    return name.strip()[:MAX_NAME_CHARS] or "anonymous"


def parse(frame):
    """One frame -> ("join", room) | ("leave", room) | ("say", room, text, name)."""
    try:
        request = json.loads(frame)
    except ValueError as e:
        raise BadRequest(f"not a request ({e}); send {REQUESTS}") from None
    if (
        not isinstance(request, dict)
        or not set(request) <= FIELDS
        or not all(v is None or isinstance(v, str) for v in request.values())
    ):
        raise BadRequest(f"not a request; send {REQUESTS}")
    given = {key for key, value in request.items() if value is not None}
    if given - {"name"} == {"join"}:
        return ("join", check_room(request["join"]))
    if given - {"name"} == {"leave"}:
        return ("leave", check_room(request["leave"]))
    if given - {"name"} == {"room", "text"}:
        if len(request["text"]) > MAX_TEXT_CHARS:
            raise BadRequest(f"text too long: at most {MAX_TEXT_CHARS} characters")
        room = check_room(request["room"])
        return ("say", room, request["text"], clean_name(request.get("name")))
    raise BadRequest(f"a request is one of {REQUESTS}")


class ChatConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        self.rooms = set()
        await self.accept()
        await self.send_event("hello", server=settings.CHAT_SERVER_ID, backend="channels_rabbitmq")

    async def disconnect(self, code):
        # Leave every room: the layer's group membership ends with the connection.
        for room in self.rooms:
            await self.channel_layer.group_discard(group_of(room), self.channel_name)
        self.rooms = set()

    async def receive(self, text_data=None, bytes_data=None):
        try:
            if text_data is None:
                raise BadRequest("send requests as JSON text frames")
            await self.handle(parse(text_data))
        except BadRequest as e:
            await self.send_event("error", error=str(e))

    async def handle(self, request):
        kind, room = request[0], request[1]
        if kind == "join":
            if room not in self.rooms and len(self.rooms) >= MAX_ROOMS:
                raise BadRequest(f"at most {MAX_ROOMS} rooms per connection")
            await self.channel_layer.group_add(group_of(room), self.channel_name)
            self.rooms.add(room)
            await self.send_event("joined", room=room)
        elif kind == "leave":
            await self.channel_layer.group_discard(group_of(room), self.channel_name)
            self.rooms.discard(room)
            await self.send_event("left", room=room)
        else:
            _, room, text, name = request
            if room not in self.rooms:
                raise BadRequest(f"join {room} before saying something in it")
            # The sender sees its own line when it comes back through the layer.
            await self.channel_layer.group_send(
                group_of(room),
                {
                    "type": "chat.message",
                    "room": room,
                    "text": text,
                    "name": name,
                    "server": settings.CHAT_SERVER_ID,
                    "sent_ms": int(time.time() * 1000),
                },
            )

    async def chat_message(self, event):
        """A line from a room this connection is in ("type": "chat.message")."""
        await self.send_event(
            "message",
            room=event["room"],
            text=event["text"],
            name=event["name"],
            server=event["server"],
            sent_ms=event["sent_ms"],
        )

    async def send_event(self, kind, **fields):
        await self.send(text_data=json.dumps({"type": kind, **fields}))
