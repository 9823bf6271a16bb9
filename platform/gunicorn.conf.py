"""gunicorn settings for the gateway (WSGI, threaded workers).

Why threads: a streamed completion holds its worker thread for as long as the provider
talks (tens of seconds), while a plain call costs a few milliseconds of CPU. gthread
workers keep many streams open per process at little memory, and Django's sync views,
ORM and DRF run without an async bridge. Measured against ASGI in the README.
"""

import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
worker_class = "gthread"
# Each open stream holds a thread: threads x workers is the concurrent-stream capacity.
threads = int(os.environ.get("GUNICORN_THREADS", "300"))
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "2000"))
backlog = 2048
keepalive = 75  # seconds; clients pool connections like the upstream client does
# gthread workers heartbeat from their main loop, so long streams do not trip this.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-")
# The request line only: never headers, so never a key.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
