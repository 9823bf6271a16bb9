"""gunicorn settings for the gateway (WSGI, threaded workers).

Why threads: a streamed completion holds its worker thread for as long as the provider
talks (tens of seconds), while a plain call costs a few milliseconds of CPU. gthread
workers keep many streams open per process at little memory, and Django's sync views,
ORM and DRF run without an async bridge. The figures are in the README.
"""

import gc
import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
worker_class = "config.workers.GatewayThreadWorker"
# Each open stream holds a thread, and a worker takes connections without looking at
# its siblings' load: in `make bench` one of two workers peaked at 273 of 500 streams.
# Threads start only when needed, so headroom costs nothing until it is used.
threads = int(os.environ.get("GUNICORN_THREADS", "400"))
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "2000"))
backlog = 2048
keepalive = 75  # seconds; clients pool connections like the upstream client does
# gthread workers heartbeat from their main loop (config.workers: once a second), so long
# streams do not trip this.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
# On SIGTERM, requests under way get this long; streams end themselves 5 s before it,
# with an error event and their ledger row (config.workers.GatewayThreadWorker).
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
# GUNICORN_ACCESSLOG="" turns the access log off.
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-") or None
# Method, path and protocol: no header and no query string, where a key travels
# (`Authorization`, or `?api_key=` from some clients), so no key. The path as the client
# sent it, percent-encoded (config.workers.GatewayLogger): a `%0A` forges no line.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'
logger_class = "config.workers.GatewayLogger"
errorlog = "-"
# gunicorn 27's control socket (gunicornc) is not used: it would be created in $HOME,
# which the image's user cannot write (an ERROR at every start).
control_socket_disable = True
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")


def post_worker_init(worker):
    """Load what the first requests would import lazily, freeze the heap, collect less.

    With hundreds of threads holding streams, Python's garbage collections walk every
    object of the app: `make bench` measured pauses of 150-200 ms, which landed on the
    first tokens of new streams. Frozen objects are never scanned again, and a larger
    first generation makes collections rarer (added time to first token at p99 went from
    19-165 ms over four runs to 19-23 ms over three).
    """
    from django.urls import get_resolver

    from routing.upstream import upstream_warm_up

    get_resolver().url_patterns  # noqa: B018  (imports every view module)
    upstream_warm_up()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
