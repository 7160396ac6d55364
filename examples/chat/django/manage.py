#!/usr/bin/env python
"""Django's command-line utility (`python manage.py check`). The server itself runs with
Daphne: `python -m daphne -b 127.0.0.1 -p 8010 chatsite.asgi:application`."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
