"""Settings shared by every environment, read from the environment with django-environ.

With nothing set, Tollgate runs on the embedded default: a SQLite file beside manage.py
and Celery tasks executed in-process. `DATABASE_URL` switches to PostgreSQL and
`CELERY_BROKER_URL` to a real broker (Redis).
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    env.read_env(str(BASE_DIR / ".env"))

DEBUG = env.bool("DJANGO_DEBUG", default=False)
# Development default only; config.settings.production refuses to start with it.
INSECURE_SECRET_KEY = "django-insecure-tollgate-development-only"  # noqa: S105
SECRET_KEY = env("DJANGO_SECRET_KEY", default=INSECURE_SECRET_KEY)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "routing",
    "tenants",
    "billing",
]

MIDDLEWARE = [
    # First, so that every response, errors included, carries x-request-id.
    "routing.middleware.RequestIdMiddleware",
    # /healthz and /readyz: before the Host check, which a probe by address would fail.
    "routing.middleware.ProbeMiddleware",
    # Before anything reads the Host header: with DEBUG on, a Host not allowed is still
    # OpenAI's 400 (with DEBUG off, handler400 answers it).
    "routing.middleware.DebugHostMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------

# The per-call statements are prepared on PostgreSQL (config.db). Off only behind a
# transaction-mode connection pooler that cannot keep prepared statements (PgBouncer
# before 1.21, or without max_prepared_statements).
TOLLGATE_DATABASE_PREPARE = env.bool("TOLLGATE_DATABASE_PREPARE", default=True)
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets readers run beside the one writer; IMMEDIATE takes the write lock at BEGIN
    # so two threads never deadlock upgrading a read lock.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's native psycopg pool: a long SSE stream gives its connection back while it
    # relays, so a few connections serve hundreds of concurrent streams.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # Checking each connection as it leaves the pool costs a round trip per checkout
    # (two per call). Off by default: the per-call statements run again once on a fresh
    # connection when theirs is dead, and have the pool check the rest then (config.db).
    # Other pages may get one error per dead connection after a database restart.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("DATABASE_POOL_CHECKS", default=False)
    if TOLLGATE_DATABASE_PREPARE:
        # psycopg prepares nothing on a connection without a threshold (Django's default);
        # Django's own cursors bind on the client and never prepare, so this applies to
        # config.db's statements only.
        DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = 5
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DATABASE_POOL_MIN", default=2),
        "max_size": env.int("DATABASE_POOL_MAX", default=20),
        "timeout": env.float("DATABASE_POOL_TIMEOUT", default=10.0),
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache ----------------------------------------------------------------------------

CACHES = {"default": env.cache("CACHE_URL", default="locmemcache://tollgate")}

# --- Auth, i18n, static ---------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# LLM requests carry long prompts and base64 images; bigger bodies get a 413 in
# OpenAI's error shape.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("TOLLGATE_MAX_BODY_BYTES", default=20 * 1024 * 1024)

# --- REST framework -------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenants.auth.StaffTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON (a 400 for a body nested too deeply), forms for the browsable API.
    "DEFAULT_PARSER_CLASSES": [
        "config.api_parsers.DepthLimitedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Decimals as strings: money never passes through a float.
    "COERCE_DECIMAL_TO_STRING": True,
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Tollgate management API",
    "DESCRIPTION": "Tenants, API keys, model allowlists and the usage ledger.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# --- Celery ---------------------------------------------------------------------------

# Budget alerts' email. EMAIL_URL: smtp://user:password@host:587 with STARTTLS as
# smtp+tls://, implicit TLS as smtp+ssl://, or consolemail:// to print them instead.
vars().update(env.email_url("EMAIL_URL", default="smtp://localhost:25"))
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="tollgate@localhost")
# A mail server that takes the connection and then stalls must not hold a worker.
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)

CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="")
# Deployments (or test runs) sharing one Redis keep their queues apart: every key the
# broker writes (queues, unacknowledged tasks, bindings) starts with this prefix.
CELERY_BROKER_KEY_PREFIX = env("CELERY_BROKER_KEY_PREFIX", default="")
if CELERY_BROKER_KEY_PREFIX:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": CELERY_BROKER_KEY_PREFIX}
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", default=None)
# No broker configured: run tasks in-process (the embedded default).
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TIMEZONE = "UTC"
CELERY_TASK_ACKS_LATE = True
CELERY_BEAT_SCHEDULE = {
    # Closes each tenant's previous month once its grace period is over.
    "invoices-close-due": {"task": "billing.tasks.invoices_close_due", "schedule": 600.0},
    # Holds and leases of processes that died mid-call: released, never left behind.
    "budget-holds-expire": {"task": "tenants.tasks.budget_holds_expire_task", "schedule": 60.0},
    "key-leases-expire": {"task": "tenants.tasks.key_leases_expire_task", "schedule": 60.0},
    # Budget alerts crossed while the broker was down: queued once it is back.
    "budget-alerts-queue-due": {
        "task": "tenants.tasks.budget_alerts_queue_due_task",
        "schedule": 60.0,
    },
}
CELERY_WORKER_PREFETCH_MULTIPLIER = 1

# --- Tollgate -------------------------------------------------------------------------

# Server-side pepper for the HMAC-SHA256 digests of API keys and staff tokens. Changing it
# invalidates every issued key. Production requires its own value.
TOLLGATE_KEY_PEPPER = env("TOLLGATE_KEY_PEPPER", default=f"pepper:{SECRET_KEY}")
# After a client disconnects mid-stream, keep reading the upstream this long to learn the
# real usage the provider bills; past it, stop and record an estimate.
TOLLGATE_DISCONNECT_DRAIN_SECONDS = env.float("TOLLGATE_DISCONNECT_DRAIN_SECONDS", default=30.0)
# How long a gateway process may serve from its snapshot of the catalog, prices and
# allowlists before reloading them. Saves clear the snapshot in their own process at
# once; a new price version must start at least this long after it is created.
TOLLGATE_CONFIG_CACHE_SECONDS = env.float("TOLLGATE_CONFIG_CACHE_SECONDS", default=5.0)
# How long after a month ends (in each tenant's time zone) its invoices are finalized,
# so that late usage events can still land in it.
TOLLGATE_INVOICE_GRACE_SECONDS = env.int("TOLLGATE_INVOICE_GRACE_SECONDS", default=3600)
# Pooled connections per upstream provider, shared by all threads of a process.
TOLLGATE_UPSTREAM_MAX_CONNECTIONS = env.int("TOLLGATE_UPSTREAM_MAX_CONNECTIONS", default=1000)
# Circuit breaker of routed targets: this many consecutive failures open it for the cooldown.
TOLLGATE_BREAKER_FAILURES = env.int("TOLLGATE_BREAKER_FAILURES", default=5)
TOLLGATE_BREAKER_COOLDOWN_SECONDS = env.float("TOLLGATE_BREAKER_COOLDOWN_SECONDS", default=30.0)
# Health figures (admin, /metrics) cover this many recent minutes of the ledger.
TOLLGATE_HEALTH_WINDOW_MINUTES = env.int("TOLLGATE_HEALTH_WINDOW_MINUTES", default=15)
# /metrics asks for `Authorization: Bearer <this>` when set. Without one it is served
# only where TOLLGATE_METRICS_OPEN (a laptop, tests; production settings turn it off).
TOLLGATE_METRICS_TOKEN = env("TOLLGATE_METRICS_TOKEN", default="")
TOLLGATE_METRICS_OPEN = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {
        # The SDK logs request ids and retries at DEBUG; never headers.
        "openai": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        # The SDK's transport as installed (httpx2 on httpcore2): its DEBUG lines quote
        # failed headers, the provider's key among them.
        "httpcore2": {"level": "WARNING"},
    },
}
