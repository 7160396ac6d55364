"""Settings of the Django side of the chat: only what a Channels chat on RabbitMQ needs.

Environment:
- CHAT_DJANGO_AMQP_URL: the RabbitMQ URL (default amqp://guest:guest@127.0.0.1:5672/%2f);
- CHAT_DJANGO_GROUPS_EXCHANGE: the exchange groups are published to (default "groups",
  channels_rabbitmq's own default; a Rust chat in wire=channels_rabbitmq mode must use the
  same, which is its default too);
- CHAT_SERVER_ID: this server's id, shown with every line it relays (default "django").
"""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# An example on loopback: no secrets to keep, no sessions, no database.
SECRET_KEY = "chanlayer-chat-example-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
INSTALLED_APPS = ["channels"]
MIDDLEWARE = []
ROOT_URLCONF = "chatsite.urls"
DATABASES = {}
USE_TZ = True

ASGI_APPLICATION = "chatsite.asgi.application"

# The channel layer: channels_rabbitmq, one exclusive queue per process, groups on a direct
# exchange. Everything else (capacities, expiry) stays at its defaults.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_rabbitmq.core.RabbitmqChannelLayer",
        "CONFIG": {
            "host": os.environ.get(
                "CHAT_DJANGO_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"
            ),
            "groups_exchange": os.environ.get("CHAT_DJANGO_GROUPS_EXCHANGE", "groups"),
        },
    },
}

CHAT_SERVER_ID = os.environ.get("CHAT_SERVER_ID", "django")
# The page is the Rust chat's own (examples/chat/src/page.html): both servers speak the same
# protocol, so one page works with either.
CHAT_PAGE = BASE_DIR.parent / "src" / "page.html"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("CHAT_DJANGO_LOG", "INFO")},
}
