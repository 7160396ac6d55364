"""Plain HTTP routes: the page and the health check (the websocket is in asgi.py)."""
from django.conf import settings
from django.http import HttpResponse
from django.urls import path


def page(request):
    # Read at each request: it is small, and an edit shows without a restart.
    return HttpResponse(settings.CHAT_PAGE.read_text(encoding="utf-8"))


def healthz(request):
    return HttpResponse("ok\n", content_type="text/plain")


urlpatterns = [
    path("", page),
    path("healthz", healthz),
]
