"""Shared fixtures: the real Redis and MariaDB (private servers this run starts, demo/mariadb_server.py; Redis on a
dedicated DB index, flushed around each test), the Dify stand-in over real sockets, app instances (in-process test
client or served on a real port), and the WeCom simulator."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import random
import secrets
import shutil
import ssl
import threading
import time
from dataclasses import dataclass

import pymysql
import pytest
import redis
from flask import Flask
from sqlalchemy import delete
from sqlalchemy.engine import make_url
from werkzeug.serving import make_server

from app import create_app
from config.settings import Settings
from demo.auth_standin import AuthStandIn
from demo.dify_standin import DifyStandIn
from demo.mariadb_server import MISSING, PrivateMariaDB, mariadb_binaries
from demo.openai_standin import OpenAIStandIn
from demo.redis_server import PrivateRedisCluster, PrivateRedisServer, PrivateSentinelSet
from demo.wecom_simulator import WeComSimulator
from demo.wecom_ws_standin import WeComWebSocketStandIn
from services.auth import db
from services.auth.users import UserDirectory
from services.gateway import build_gateway
from services.keys import Keys
from services.streams.record import FIELDS

# Servers of your choice instead of the private ones the suite starts (demo/); their data is flushed.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "")
TEST_MYSQL_SERVER = os.environ.get("TEST_MYSQL_SERVER", "")
TOKEN = "test-token-Zq8"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
DIFY_KEY = "app-test-key-0001"
AUTH_KEY = "svc-auth-key-0001"
RUN_LOG_LEVEL = logging.getLogger().level
KEYS = Keys()  # the key names, as the gateway builds them (no prefix)
# File heads the gateway sniffs (services/media/service.py), with bodies of no meaning.
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
JPEG = b"\xff\xd8\xff\xe0" + b"\x10JFIF" + bytes(500)


@pytest.fixture(autouse=True)
def root_log_level_restored():
    """Each test starts at the log level the run began with: an app built with LOG_LEVEL=ERROR (the fuzz checks')
    leaves the root logger there, and a later test in the same worker would capture no warning."""
    logging.getLogger().setLevel(RUN_LOG_LEVEL)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The tests' Redis (DB 15): TEST_REDIS_URL if set, else a private redis-server of this run's own."""
    if TEST_REDIS_URL:
        _check_answers(lambda: redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2).ping(), "TEST_REDIS_URL")
        yield TEST_REDIS_URL
        return
    if shutil.which("redis-server") is None:
        pytest.exit(MISSING.format(what="redis-server"), returncode=3)
    server = PrivateRedisServer(tmp_path_factory.mktemp("redis")).start()
    yield f"redis://127.0.0.1:{server.port}/15"
    server.stop()


@pytest.fixture(scope="session")
def mysql_server() -> str:
    """The tests' MariaDB/MySQL server (no database): TEST_MYSQL_SERVER if set, else a private MariaDB."""
    if TEST_MYSQL_SERVER:
        yield TEST_MYSQL_SERVER
        return
    if mariadb_binaries() is None:
        pytest.exit(MISSING.format(what="MariaDB's server (mariadb-server)"), returncode=3)
    server = PrivateMariaDB().start()
    yield server.url
    server.remove()


def _check_answers(probe, variable: str) -> None:
    try:
        probe()
    except Exception as exc:
        pytest.exit(f"{variable} does not answer ({exc}); unset it to let the suite start its own", returncode=3)


@pytest.fixture
def redis_client(redis_url):
    """A client on the test DB, flushed before and after the test. Every key the gateway writes has a TTL
    (docs/redis-keys.md): one the test leaves behind without one fails it."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    forever = sorted(key for key in client.scan_iter(count=1000) if client.ttl(key) == -1)
    undeclared = undeclared_stream_fields(client)
    client.flushdb()
    client.close()
    assert not forever, f"keys left behind without a TTL: {forever[:10]}"
    assert not undeclared, f"stream record fields not named in services/streams/record.py: {undeclared}"


def undeclared_stream_fields(client: redis.Redis) -> list[str]:
    """The fields of the stream records in Redis that the record's schema does not name (services/streams/record.py):
    every test on this client checks what it made, so a field written anywhere but declared nowhere fails one."""
    found: set[str] = set()
    for key in client.scan_iter(match="*dify_stream:{*}", count=1000):
        if client.type(key) == "hash":
            found |= set(client.hkeys(key)) - FIELDS.keys()
    return sorted(found)


@pytest.fixture(scope="session")
def mysql_databases(mysql_server):
    """Databases on the test MariaDB/MySQL server, created for this run and dropped at its end:
    `mysql_databases(role)` -> the URL of the run's database for that role ("primary", "replica", ...)."""
    server = make_url(mysql_server)
    try:
        admin = pymysql.connect(
            host=server.host,
            port=server.port or 3306,
            user=server.username,
            password=server.password or "",
            connect_timeout=3,
            autocommit=True,
        )
    except pymysql.MySQLError as exc:
        pytest.exit(
            f"MariaDB/MySQL does not answer at {server.host}:{server.port} ({exc}); unset TEST_MYSQL_SERVER to let "
            "the suite start its own",
            returncode=3,
        )
    created: dict[str, str] = {}

    def database(role: str) -> str:
        if role not in created:
            name = f"gw_test_{os.getpid()}_{secrets.token_hex(3)}_{role}"
            with admin.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
            created[role] = name
        return server.set(database=created[role]).render_as_string(hide_password=False)

    yield database
    with admin.cursor() as cursor:
        for name in created.values():
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    admin.close()


@pytest.fixture(scope="session")
def mysql_url(mysql_databases) -> str:
    """The run's database (the primary, where a test has a replica too)."""
    return mysql_databases("primary")


@pytest.fixture(scope="session")
def auth_server():
    server = AuthStandIn(api_key=AUTH_KEY).start()
    yield server
    server.stop()


@pytest.fixture
def auth(auth_server) -> AuthStandIn:
    """The auth API stand-in, answering normally, with no recorded calls."""
    auth_server.reset()
    yield auth_server
    auth_server.reset()


@pytest.fixture(scope="session")
def dify_server():
    server = DifyStandIn(api_key=DIFY_KEY, ping_interval=0.2, demo_delay=0.005).start()
    yield server
    server.stop()


@pytest.fixture
def dify(dify_server) -> DifyStandIn:
    """The Dify stand-in with no scripts and no recorded requests."""
    dify_server.reset()
    yield dify_server
    dify_server.reset()


OPENAI_KEY, OPENAI_MODEL = "sk-test-openai-key-0123456789", "test-model"


@pytest.fixture(scope="session")
def openai_server():
    server = OpenAIStandIn(api_key=OPENAI_KEY, model=OPENAI_MODEL).start()
    yield server
    server.stop()


@pytest.fixture
def openai(openai_server) -> OpenAIStandIn:
    """The OpenAI-compatible stand-in with no scripts and no recorded requests (words 5 ms apart)."""
    openai_server.reset()
    openai_server.delay = 0.005
    yield openai_server
    openai_server.reset()


def openai_settings(server: OpenAIStandIn, **more) -> dict:
    """The settings of a bot answered by the OpenAI-compatible `server` (make_app's keyword arguments)."""
    return {
        "backend": "openai",
        "openai_base_url": server.base_url,
        "openai_api_key": OPENAI_KEY,
        "openai_model": OPENAI_MODEL,
        **more,
    }


@pytest.fixture
def settings(redis_url, redis_client, dify) -> Settings:
    return Settings.of(
        wecom_token=TOKEN,
        wecom_encoding_aes_key=AES_KEY,
        dify_base_url=dify.base_url,
        dify_api_key=DIFY_KEY,
        dify_read_timeout=3.0,
        dify_retry_backoff=0.01,
        redis_url=redis_url,
        auth_mode="none",
        replica_id="replica-a",
        stream_lease_seconds=3,
        stream_takeover_grace_seconds=0,  # take-over tests time it from the lease; the grace has tests of its own
        dify_retry_seconds=0,  # a refused question gets its note at once; asking again has tests of its own
        auth_retry_seconds=0,  # as a user table or an auth API away
        log_format="text",
    )


@pytest.fixture
def make_app(settings):
    """Build app instances (`make_app(replica_id="replica-b", ...)`); all are drained and closed afterwards, and
    their answers' threads, told there is nothing left to wait for, are given a few seconds to end (a thread that
    waited for a Redis the test stopped would count in the next test's `streams_active`)."""
    apps: list[Flask] = []

    def factory(**changes) -> Flask:
        app = create_app(settings.replace(**changes) if changes else settings)
        app.extensions["gateway"].start()  # served, as a gunicorn worker is
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield factory
    for app in apps:
        gateway = app.extensions["gateway"]
        gateway.runner.drain(10)
        gateway.close()
    for app in apps:
        wait_until(lambda runner=app.extensions["gateway"].runner: runner.active_count == 0, timeout=5)


@pytest.fixture
def app(make_app) -> Flask:
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@dataclass
class LiveServer:
    app: Flask
    url: str
    server: object

    @property
    def gateway(self):
        return self.app.extensions["gateway"]


@pytest.fixture
def serve():
    """Serve apps on real ports: `serve(app)` -> LiveServer (stopped after the test)."""
    servers = []

    def start(app: Flask) -> LiveServer:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return LiveServer(app, f"http://127.0.0.1:{server.server_port}", server)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def live(app, serve) -> LiveServer:
    return serve(app)


@pytest.fixture
def make_pair(make_app, serve):
    """Two replicas on real ports sharing the test Redis: `make_pair(**setting changes)` -> (replica-a, replica-b)."""

    def start(**changes) -> tuple[LiveServer, LiveServer]:
        return tuple(serve(make_app(replica_id=f"replica-{name}", **changes)) for name in "ab")

    return start


@pytest.fixture
def pair(make_pair) -> tuple[LiveServer, LiveServer]:
    return make_pair()


@pytest.fixture
def sims(pair):
    """A WeCom simulator for each replica of `pair` (a module may give `pair` settings of its own)."""
    made = [make_simulator(server.url) for server in pair]
    yield made
    for sim in made:
        sim.close()


@pytest.fixture
def user_table(mysql_url):
    """The test database's wecom_users table, created if needed and emptied: add the users a test needs."""
    engine = db.make_engine(mysql_url, timeout=3)
    db.init_schema(engine)
    with engine.begin() as connection:
        connection.execute(delete(db.wecom_users))
    yield UserDirectory(engine)
    engine.dispose()


class FirstReplyLost(random.Random):
    """The draws of a link's `lose_replies` (bench/faults/proxy.py) that lose the first reply through it, and no
    other."""

    def __init__(self):
        super().__init__(0)
        self.draws = 0

    def random(self):
        self.draws += 1
        return 0.0 if self.draws == 1 else 1.0


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def outbox_settled(client: redis.Redis, bot_id: str, timeout: float = 20.0) -> bool:
    """Wait until the bot's long-connection outbox has nothing left to send: no stream tracked (each was sent whole,
    or given up) and no claim on one still `sending`, nor a send `handed` and not yet settled. The outbox sends only
    what it tracks, so what a test counts after this is all it will ever send: a test asserting "once" waits for
    this, not for a fixed time."""
    keys = Keys()

    def settled() -> bool:
        if client.zcard(keys.ws_open(bot_id)):
            return False
        claims = client.scan_iter(match=keys.ws_outbox("*"), count=1000)
        return not any((client.get(key) or "").startswith(("sending", "handed")) for key in claims)

    return wait_until(settled, timeout)


def files_sent(client: redis.Redis, stream_id: str, timeout: float = 20.0) -> bool:
    """Wait until a long-connection answer's files are marked sent: they are uploaded and sent once, under that
    marker, so nothing more of them can come after it."""
    return wait_until(lambda: client.get(Keys().ws_files(stream_id)) == "sent", timeout)


def wait_idle(*servers: LiveServer, timeout: float = 10.0) -> None:
    """Wait until no stream runs on any of these replicas: every Dify call they will make has been made."""
    assert wait_until(lambda: all(s.gateway.runner.active_count == 0 for s in servers), timeout), "streams still run"


def make_simulator(urls, **kwargs) -> WeComSimulator:
    kwargs.setdefault("poll_interval", 0.05)
    return WeComSimulator(urls, TOKEN, AES_KEY, **kwargs)


@pytest.fixture
def simulator(live):
    sim = make_simulator(live.url)
    yield sim
    sim.close()


@pytest.fixture
def wecom_ws():
    """WeCom's long-connection server, played by the stand-in: `wecom_ws({bot_id: secret})` starts one (stopped
    after the test)."""
    started = []

    def start(bots: dict[str, str]) -> WeComWebSocketStandIn:
        server = WeComWebSocketStandIn(bots).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


WS_BOT_ID, WS_BOT_SECRET = "test-ws-bot", "test-ws-secret"


@pytest.fixture
def ws_gateway(settings, wecom_ws, tmp_path):
    """A long-connection gateway holding its bot's WebSocket (WeCom played by the stand-in):
    `ws_gateway(**setting changes)` -> (gateway, stand-in); drained and closed after the test."""
    started = []

    def start(**changes):
        wecom = wecom_ws({WS_BOT_ID: WS_BOT_SECRET})
        mode = {"wecom_bot_id": WS_BOT_ID, "wecom_bot_secret": WS_BOT_SECRET, "wecom_ws_url": wecom.url}
        bot = settings.replace(wecom_mode="long_connection", **mode, **changes)
        gateway = build_gateway(bot, (bot.bot,), tmp_path)
        gateway.start()
        started.append(gateway)
        assert wait_until(lambda: wecom.subscribed(WS_BOT_ID) == 1, timeout=10)
        return gateway, wecom

    yield start
    for gateway in started:
        gateway.drain(5)
        gateway.close()


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedisServer(tmp_path).start()
    yield server
    server.stop()


SENTINEL_PASSWORD = "sentinel-secret-77"


@pytest.fixture(scope="session")
def sentinel_set():
    """A master, two replicas and three sentinels on private ports (the sentinels require a password)."""
    topology = PrivateSentinelSet(sentinel_password=SENTINEL_PASSWORD).start()
    yield topology
    topology.stop()


@pytest.fixture(scope="session")
def redis_cluster():
    """A Redis Cluster of three masters with a replica each, on private ports."""
    topology = PrivateRedisCluster().start()
    yield topology
    topology.stop()


@dataclass
class Topology:
    """A Redis topology as a test uses it: its REDIS_URL, a client, and the settings that reach it."""

    name: str
    url: str
    server: object  # PrivateRedisServer, PrivateSentinelSet or PrivateRedisCluster

    @property
    def settings(self) -> dict:
        return {"redis_url": self.url, "redis_sentinel_password": SENTINEL_PASSWORD}

    def client(self):
        """A client of the topology (redis-py's own kind for it)."""
        from services.redis_conn import connect_redis

        return connect_redis(self.url, sentinel_password=SENTINEL_PASSWORD)

    def keys_without_ttl(self) -> list[str]:
        """The keys it holds that would live for ever (on every master of a cluster)."""
        client = self.client()
        try:
            return sorted(key for key in client.scan_iter(count=1000) if client.ttl(key) == -1)
        finally:
            client.close()

    def flush(self) -> None:
        """Empty it: every master of a private topology, the test database of the shared server."""
        if self.server is not None:
            self.server.flush()
            return
        client = self.client()
        client.flushdb()
        client.close()


@pytest.fixture(params=["standalone", "sentinel", "cluster"])
def topology(request, redis_url) -> Topology:
    """Each Redis topology in turn, flushed before and after the test; a key the test leaves without a TTL fails
    it (docs/redis-keys.md: every key has one)."""
    if request.param == "standalone":
        found = Topology("standalone", redis_url, None)
    elif request.param == "sentinel":
        server = request.getfixturevalue("sentinel_set")
        found = Topology("sentinel", server.url, server)
    else:
        server = request.getfixturevalue("redis_cluster")
        found = Topology("cluster", server.url, server)
    found.flush()
    yield found
    forever = found.keys_without_ttl()
    found.flush()
    assert not forever, f"keys left behind without a TTL: {forever[:10]}"


@dataclass
class TestTLS:
    """A private CA and a server certificate it signed, for 127.0.0.1 and dify.test."""

    ca_file: str
    cert_file: str
    key_file: str

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """Trusts the private CA only, and checks the host name, as a client in production does."""
        return ssl.create_default_context(cafile=self.ca_file)


@pytest.fixture(scope="session")
def tls(tmp_path_factory) -> TestTLS:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject, issuer, public_key, signing_key, ca: bool, names=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test CA", "test CA", ca_key.public_key(), ca_key, ca=True)
    names = (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("dify.test"))
    cert = certificate("dify.test", "test CA", key.public_key(), ca_key, ca=False, names=names)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "cert.pem").write_bytes(cert.public_bytes(pem))
    (folder / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TestTLS(str(folder / "ca.pem"), str(folder / "cert.pem"), str(folder / "key.pem"))
