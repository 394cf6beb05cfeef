"""TLS to the broker (`broker.tls`: ca_file, optional cert_file + key_file,
TLS 1.2 or later), against a real Mosquitto 2.0 TLS listener.

Every certificate is made here with the `openssl` command line (EC P-256, in
a module tmp dir): a CA, a server certificate for 127.0.0.1 (subjectAltName
IP:127.0.0.1 and DNS:localhost), a client certificate from the same CA, a
second, unrelated CA, a server certificate that expired in 2020 (`openssl ca
-startdate/-enddate`), one issued for another host name, and a client
certificate from the unrelated CA.

The broker (brokers.TLSMosquitto) has its plain listener, which the tests
publish through, and one TLS listener that the relay is pointed at. A
refused connection must be refused every time (no row, nothing accepted),
retried with the reconnect backoff (a counting TCP forwarder between relay
and broker counts the attempts), and explained: the daemon log, the systemd
STATUS= line and the stats reply (`broker.last_error`) say why in words an
operator can act on ("certificate has expired", not only "a TLS error").
"""
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as paho
import pytest

from brokers import BrokerStartError, TLSMosquitto, mqtt_connack, publish, tls_connack
from consumer_client import ConsumerClient
from relay import CMDRELAYD, Relay
from test_failover import with_hosts

EX_CONFIG = 78
REFUSED_TIMEOUT = 20        # seconds a refused relay gets to show 3 attempts and its reason


# -- certificates ---------------------------------------------------------------

class PKI:
    """Certificates made with the openssl command line, in one directory."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.serial = 0x1000

    def openssl(self, *args):
        r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                           cwd=self.dir, timeout=60)
        assert r.returncode == 0, f"openssl {' '.join(map(str, args))} failed:\n{r.stderr}"
        return r.stdout

    def _key_and_csr(self, name, cn):
        key, csr = self.dir / f"{name}.key", self.dir / f"{name}.csr"
        self.openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
        return key, csr

    def ca(self, name):
        """A self-signed CA: returns its directory-relative names as a dict."""
        key, pem = self.dir / f"{name}.key", self.dir / f"{name}.pem"
        self.openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", key, "-out", pem, "-days", "3650", "-subj", f"/CN=cmdrelay test {name}",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        db = self.dir / f"{name}.db"
        db.mkdir()
        (db / "index.txt").write_text("")
        (db / "serial").write_text("1000\n")
        (db / "openssl.cnf").write_text(
            "[ca]\ndefault_ca = ca_default\n"
            "[ca_default]\n"
            f"database = {db}/index.txt\nnew_certs_dir = {db}\nserial = {db}/serial\n"
            "default_md = sha256\npolicy = policy_any\nunique_subject = no\ncopy_extensions = none\n"
            "[policy_any]\ncommonName = supplied\n")
        return {"name": name, "pem": pem, "key": key, "cnf": db / "openssl.cnf"}

    def issue(self, name, ca, cn, extensions, startdate=None, enddate=None, days=365):
        """A certificate signed by ca (`openssl ca`), with the given X509v3
        extension lines; startdate/enddate as YYYYMMDDHHMMSSZ."""
        key, csr = self._key_and_csr(name, cn)
        ext = self.dir / f"{name}.ext"
        ext.write_text("[ext]\n" + "\n".join(extensions) + "\n")
        pem = self.dir / f"{name}.pem"
        dates = ["-days", str(days)]
        if startdate:
            dates = ["-startdate", startdate, "-enddate", enddate]
        self.openssl("ca", "-batch", "-config", ca["cnf"], "-cert", ca["pem"], "-keyfile", ca["key"],
                     "-in", csr, "-out", pem, "-notext", "-extfile", ext, "-extensions", "ext", *dates)
        return {"name": name, "pem": pem, "key": key}


SERVER_EXT = ["basicConstraints = CA:FALSE", "keyUsage = critical, digitalSignature",
              "extendedKeyUsage = serverAuth", "subjectAltName = IP:127.0.0.1, DNS:localhost"]
CLIENT_EXT = ["basicConstraints = CA:FALSE", "keyUsage = critical, digitalSignature",
              "extendedKeyUsage = clientAuth"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = PKI(tmp_path_factory.mktemp("pki"))
    p.ca_ = p.ca("ca")
    p.other_ca = p.ca("other-ca")
    p.server = p.issue("server", p.ca_, "localhost", SERVER_EXT)
    p.client = p.issue("client", p.ca_, "cmdrelay-gateway", CLIENT_EXT)
    p.expired = p.issue("server-expired", p.ca_, "localhost", SERVER_EXT,
                        startdate="20200101000000Z", enddate="20200201000000Z")
    p.wrong_host = p.issue("server-wrong-host", p.ca_, "broker.invalid",
                           SERVER_EXT[:-1] + ["subjectAltName = DNS:broker.invalid"])
    p.foreign_client = p.issue("client-foreign", p.other_ca, "cmdrelay-gateway", CLIENT_EXT)
    # what the tests rely on, checked with openssl itself
    p.openssl("verify", "-CAfile", p.ca_["pem"], p.server["pem"], p.client["pem"])
    dates = p.openssl("x509", "-in", p.expired["pem"], "-noout", "-enddate")
    assert "2020" in dates, dates
    return p


# -- brokers, relays and what they say ------------------------------------------

def openssl_conf(directory, min_protocol, max_protocol, seclevel=None):
    """An OPENSSL_CONF for the broker process that pins its TLS versions
    (mosquitto's own tls_version only sets a minimum)."""
    path = Path(directory) / f"openssl-{min_protocol}-{max_protocol}.cnf"
    lines = ["openssl_conf = openssl_init", "[openssl_init]", "ssl_conf = ssl_sect", "[ssl_sect]",
             "system_default = system_default_sect", "[system_default_sect]",
             f"MinProtocol = {min_protocol}", f"MaxProtocol = {max_protocol}"]
    if seclevel is not None:
        lines.append(f"CipherString = DEFAULT:@SECLEVEL={seclevel}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tls_broker(tmp_path, pki, cleanup):
    """start(cert=pki.server, openssl_conf=None, persistence=False, **TLSMosquitto options)."""
    count = [0]

    def start(cert=None, openssl_conf=None, persistence=False, **kw):
        cert = cert or pki.server
        count[0] += 1
        m = TLSMosquitto(tmp_path / f"mosquitto{count[0]}", cafile=pki.ca_["pem"],
                         certfile=cert["pem"], keyfile=cert["key"], **kw)
        cleanup(m.stop)
        saved = os.environ.get("OPENSSL_CONF")
        if openssl_conf:
            os.environ["OPENSSL_CONF"] = str(openssl_conf)
        try:
            m.start(persistence=persistence)
        except BrokerStartError as e:
            pytest.fail(f"mosquitto with a TLS listener failed to start:\n{e}", pytrace=False)
        finally:
            if openssl_conf:
                if saved is None:
                    del os.environ["OPENSSL_CONF"]
                else:
                    os.environ["OPENSSL_CONF"] = saved
        return m
    return start


class ConnectCounter:
    """A TCP forwarder on 127.0.0.1 to (host, port) that counts the
    connections made through it: the relay's connection attempts."""

    def __init__(self, host, port):
        self.target = (host, port)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.lsock.settimeout(0.2)
        self.host, self.port = self.lsock.getsockname()
        self.attempts = 0
        self.closing = False
        self.socks = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.closing:
            try:
                client, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.attempts += 1
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.closing = True
        self.lsock.close()
        self.thread.join(2)
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


def tls_conf(ca=None, cert=None):
    conf = {"ca_file": str(ca["pem"])} if ca else {}
    if cert:
        conf.update(cert_file=str(cert["pem"]), key_file=str(cert["key"]))
    return conf


def make_relay(tmp_path, broker, uid, cleanup, tls, port=None, name="relay"):
    """A relay (not started) pointed at the TLS port (or port) of broker."""
    relay = Relay(tmp_path / name, broker, f"gateway-{uid}", [topic(uid)],
                  broker__port=port or broker.tls_port, broker__tls=tls)
    cleanup(lambda: relay.kill() if relay.running() else None)
    return relay


def topic(uid):
    return f"/cf/v1/AAA/{uid}/dev1/set"


def scrubbed_log(relay, tmp_path):
    """The log since the last start, with the test's tmp paths (which carry
    the test name) replaced, so that keywords are not found in file names."""
    return relay.log(since_start=True).replace(str(tmp_path), "<tmp>")


def last_status(relay):
    seen = relay.notify.seen("STATUS=")
    return seen[-1] if seen else ""


def relay_stats(relay):
    with ConsumerClient.connect(relay.workdir / "cmdrelay.sock") as c:
        return c.stats()


def payloads(relay):
    return [bytes(r["payload"]).decode() for r in relay.accepted()]


def assert_relays_commands(relay, broker, uid, n=3):
    """Commands published through the plain listener arrive over TLS."""
    sent = [f"cmd-{uid}-{i}" for i in range(n)]
    for p in sent:
        publish(broker, topic(uid), p)
    relay.wait_count(n, "status = 'accepted'", timeout=30)
    assert payloads(relay) == sent
    relay.wait_for(lambda: last_status(relay).startswith("STATUS=connected"), 10, "STATUS connected")
    st = relay_stats(relay)
    assert st["broker"]["connected"] is True, st
    assert st["broker"]["last_error"] == "", st


def assert_refused(relay, broker, uid, counter, tmp_path, reason, what):
    """The relay runs, never connects, keeps trying (3 attempts through the
    counter), stores nothing, and its log, STATUS= and stats name `reason`
    (a regular expression, case-insensitive) — all within REFUSED_TIMEOUT."""
    rx = re.compile(reason, re.I)
    publish(broker, topic(uid), f"never-{uid}")     # would be relayed if it connected
    deadline = time.monotonic() + REFUSED_TIMEOUT
    state, st, next_stats = {}, None, 0.0
    while time.monotonic() < deadline:
        assert relay.running(), f"cmdrelayd exited {relay.proc.poll()}:\n{relay.log()}"
        log = scrubbed_log(relay, tmp_path)
        status = last_status(relay)
        if time.monotonic() >= next_stats:         # a consumer connection each time: not too often
            st = relay_stats(relay)["broker"]
            next_stats = time.monotonic() + 1.0
        state = {
            "attempts": counter.attempts,
            "log names the reason": bool(rx.search(log)),
            "STATUS says disconnected and why": status.startswith("STATUS=disconnected")
                                                  and bool(rx.search(status)),
            "stats: not connected, last_error says why": st["connected"] is False
                                                          and bool(rx.search(st["last_error"])),
        }
        if counter.attempts >= 3 and all(v for k, v in state.items() if k != "attempts"):
            break
        time.sleep(0.25)
    assert relay.count() == 0, f"{what}: rows were stored: {relay.rows()}"
    assert "connected to" not in relay.log(since_start=True), f"{what}: the relay connected:\n{relay.log()}"
    problems = []
    if state.get("attempts", 0) < 3:
        problems.append(f"only {state.get('attempts')} connection attempt(s) in {REFUSED_TIMEOUT}s "
                        f"(reconnect min_delay 100ms, max_delay 2s): the relay stopped retrying")
    problems += [k for k, v in state.items() if k != "attempts" and not v]
    assert not problems, (
        f"{what}: expected /{reason}/ everywhere; failed: {problems}\n"
        f"--- STATUS: {last_status(relay)!r}\n--- stats broker: {relay_stats(relay)['broker']}\n"
        f"--- cmdrelayd log:\n{relay.log(since_start=True)[-4000:]}\n"
        f"--- mosquitto log (tail):\n{broker.read_log()[-2000:]}")


def start_refused(tmp_path, broker, uid, cleanup, tls, port=None):
    """A relay started behind a ConnectCounter, not waiting for SUBACKs."""
    counter = ConnectCounter(broker.host, port or broker.tls_port)
    cleanup(counter.close)
    relay = make_relay(tmp_path, broker, uid, cleanup, tls, port=counter.port)
    relay.start(wait_subscribed=False)
    return relay, counter


def publish_tls(host, port, cafile, topic_, payload, timeout=10):
    """One QoS 1 publication through the TLS listener (paho, verifying the server)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(cafile))
    c = paho.Client(client_id=f"tlspub-{os.getpid()}-{time.monotonic_ns()}", clean_session=True,
                    protocol=paho.MQTTv311)
    c.tls_set_context(ctx)
    c.connect(host, port, keepalive=10)
    c.loop_start()
    try:
        info = c.publish(topic_, payload, qos=1)
        info.wait_for_publish(timeout)
        assert info.is_published(), "no PUBACK through the TLS listener"
    finally:
        c.disconnect()
        c.loop_stop()


# -- it works -------------------------------------------------------------------

def test_tls_with_the_right_ca(tmp_path, pki, tls_broker, uid, cleanup):
    """TLS with the broker's CA: subscribed, commands from the plain listener
    and from a TLS publisher are relayed, STATUS/stats say connected."""
    m = tls_broker()
    relay = make_relay(tmp_path, m, uid, cleanup, tls_conf(pki.ca_))
    relay.start()
    assert_relays_commands(relay, m, uid)
    publish_tls(m.host, m.tls_port, pki.ca_["pem"], topic(uid), f"via-tls-{uid}")
    relay.wait_count(4, "status = 'accepted'")
    assert payloads(relay)[-1] == f"via-tls-{uid}"
    relay.stop()


def test_mutual_tls_with_client_certificate(tmp_path, pki, tls_broker, uid, cleanup):
    """require_certificate on the broker, cert_file/key_file in the relay: works."""
    m = tls_broker(require_certificate=True)
    code, err = tls_connack(m.host, m.tls_port, pki.ca_["pem"])
    assert code is None, f"the listener let a client in without a certificate ({code}, {err})"
    relay = make_relay(tmp_path, m, uid, cleanup, tls_conf(pki.ca_, pki.client))
    relay.start()
    assert_relays_commands(relay, m, uid)
    relay.stop()


def test_client_certificate_renewed_in_place(tmp_path, pki, tls_broker, uid, cleanup):
    """cert_file/key_file replaced in place (same paths, renamed over, as
    certificate renewal tools do): the next connection presents the new
    certificate (the broker takes the CN as the username)."""
    old = pki.issue(f"client-old-{uid}", pki.ca_, f"old-{uid}", CLIENT_EXT)
    new = pki.issue(f"client-new-{uid}", pki.ca_, f"new-{uid}", CLIENT_EXT)
    live = {"pem": tmp_path / "client.pem", "key": tmp_path / "client.key"}
    for k in ("pem", "key"):
        shutil.copy(old[k], live[k])
    m = tls_broker(require_certificate=True, extra=["use_identity_as_username true"])
    relay = make_relay(tmp_path, m, uid, cleanup, tls_conf(pki.ca_, live))
    relay.start()
    for k in ("key", "pem"):
        shutil.copy(new[k], f"{live[k]}.tmp")
        os.rename(f"{live[k]}.tmp", live[k])
    m.restart()                                     # the relay reconnects
    relay.wait_for(lambda: f"u'new-{uid}'" in m.read_log(), 20, "a connection with the new certificate")
    assert f"u'old-{uid}'" in m.read_log()
    relay.wait_for(lambda: relay.log(since_start=True).count("subscriptions in place") >= 2, 20,
                   "the subscriptions after the reconnect")     # the restarted broker lost the session
    assert_relays_commands(relay, m, uid, n=1)
    relay.stop()


@pytest.mark.parametrize("tls_version", ["tlsv1.2", "tlsv1.3"])
def test_tls_versions_accepted(tmp_path, pki, tls_broker, uid, cleanup, tls_version):
    """TLS 1.2 or later: a broker that speaks only TLS 1.2 (OpenSSL
    MaxProtocol) and one that speaks only TLS 1.3 (tls_version) both work."""
    if tls_version == "tlsv1.2":
        m = tls_broker(openssl_conf=openssl_conf(tmp_path, "TLSv1.2", "TLSv1.2"))
        code, err = tls_connack(m.host, m.tls_port, pki.ca_["pem"], min_version=ssl.TLSVersion.TLSv1_3)
        assert code is None, f"the TLS 1.2 listener accepted TLS 1.3 ({code}, {err})"
    else:
        m = tls_broker(tls_version="tlsv1.3")
        code, err = tls_connack(m.host, m.tls_port, pki.ca_["pem"], max_version=ssl.TLSVersion.TLSv1_2)
        assert code is None, f"the TLS 1.3 listener accepted TLS 1.2 ({code}, {err})"
    relay = make_relay(tmp_path, m, uid, cleanup, tls_conf(pki.ca_))
    relay.start()
    assert_relays_commands(relay, m, uid, n=2)
    relay.stop()


# -- it is refused, again and again, and says why --------------------------------

CERT_REASON = r"certificate verify failed|unable to get (local )?issuer certificate|unknown ca|self.signed"


def test_wrong_ca_is_refused(tmp_path, pki, tls_broker, uid, cleanup):
    """ca_file is a CA that did not sign the broker's certificate: no
    connection, retried, and the log/STATUS/stats say it is the certificate."""
    m = tls_broker()
    assert tls_connack(m.host, m.tls_port, pki.ca_["pem"])[0] == 0, "the listener itself is broken"
    relay, counter = start_refused(tmp_path, m, uid, cleanup, tls_conf(pki.other_ca))
    assert_refused(relay, m, uid, counter, tmp_path, CERT_REASON, "wrong CA")


def test_expired_server_certificate_is_refused(tmp_path, pki, tls_broker, uid, cleanup):
    """The broker presents a certificate that expired in 2020 (right CA)."""
    m = tls_broker(cert=pki.expired)
    code, err = tls_connack(m.host, m.tls_port, pki.ca_["pem"])
    assert code is None and "expired" in err, (code, err)
    relay, counter = start_refused(tmp_path, m, uid, cleanup, tls_conf(pki.ca_))
    # libmosquitto 2.0 verifies with its own callback and reports only
    # OpenSSL's "certificate verify failed", not the X509 reason (expired).
    assert_refused(relay, m, uid, counter, tmp_path, CERT_REASON, "expired server certificate")


def test_server_certificate_for_another_host_is_refused(tmp_path, pki, tls_broker, uid, cleanup):
    """The broker's certificate is valid and from the right CA but names
    broker.invalid, not 127.0.0.1: the host name is verified too."""
    m = tls_broker(cert=pki.wrong_host)
    code, err = tls_connack(m.host, m.tls_port, pki.ca_["pem"])
    assert code is None and "mismatch" in err, (code, err)
    relay, counter = start_refused(tmp_path, m, uid, cleanup, tls_conf(pki.ca_))
    assert_refused(relay, m, uid, counter, tmp_path,
                   r"certificate verify failed|host ?name|IP address mismatch|does not match",
                   "server certificate for another host")


def test_each_endpoint_is_checked_against_its_own_host_name(tmp_path, pki, tls_broker, uid, cleanup):
    """broker.hosts with TLS (issue 17): broker.tls applies to every endpoint,
    and each certificate is checked against the host name of the endpoint
    that sent it. Both brokers serve one certificate, for IP 127.0.0.1 only:
    reached as localhost the first is refused (named, with the reason), and
    the relay fails over to the second, reached as 127.0.0.1, and relays
    through it. Checking every host against the first name would refuse the
    second too; checking none would take the first."""
    ip_only = pki.issue(f"server-ip-only-{uid}", pki.ca_, "127.0.0.1",
                        SERVER_EXT[:-1] + ["subjectAltName = IP:127.0.0.1"])
    a, b = tls_broker(cert=ip_only), tls_broker(cert=ip_only)
    assert tls_connack("127.0.0.1", a.tls_port, pki.ca_["pem"]) == (0, ""), "a is sound under its IP"
    code, err = tls_connack("localhost", a.tls_port, pki.ca_["pem"])
    assert code is None and "mismatch" in err, (code, err)
    relay = make_relay(tmp_path, b, uid, cleanup, tls_conf(pki.ca_))
    first, second = f"localhost:{a.tls_port}", f"127.0.0.1:{b.tls_port}"
    with_hosts(relay, [first, second])
    relay.start()
    log = scrubbed_log(relay, tmp_path)
    assert f"{first}: cannot connect: host name verification failed" in log, log
    assert f"failing over from {first} to {second}: cannot connect: host name verification failed" in log, log
    assert f"connected to {second} as gateway-{uid}" in log, log
    assert_relays_commands(relay, b, uid)
    st = relay_stats(relay)["broker"]
    assert (st["host"], st["port"]) == ("127.0.0.1", b.tls_port), st
    assert st["left"].startswith(f"{first}: cannot connect: host name verification failed"), st
    assert f"as gateway-{uid}" not in a.read_log(), "the refused endpoint got no CONNECT"


def test_recovers_by_itself_when_the_broker_certificate_is_renewed(tmp_path, pki, tls_broker, uid,
                                                                    cleanup):
    """The relay holds its durable session over TLS; the broker restarts
    with an expired certificate (refused: retried, reason given) while a
    command waits in the session; the broker restarts again with a renewed
    certificate: the relay reconnects by itself and gets the command, once."""
    m = tls_broker(persistence=True)
    counter = ConnectCounter(m.host, m.tls_port)
    cleanup(counter.close)
    relay = make_relay(tmp_path, m, uid, cleanup, tls_conf(pki.ca_), port=counter.port)
    relay.start()
    publish(m, topic(uid), f"before-{uid}")
    relay.wait_count(1, "status = 'accepted'")

    m.stop()
    m.certfile, m.keyfile = pki.expired["pem"], pki.expired["key"]
    m.start(persistence=True)
    attempts = counter.attempts
    publish(m, topic(uid), f"during-{uid}")          # queued in the relay's session
    relay.wait_for(lambda: counter.attempts >= attempts + 3, REFUSED_TIMEOUT,
                   "3 more connection attempts against the expired certificate")
    assert re.search(CERT_REASON, scrubbed_log(relay, tmp_path), re.I), relay.log(since_start=True)
    assert relay.count() == 1

    m.stop()
    m.certfile, m.keyfile = pki.server["pem"], pki.server["key"]
    m.start(persistence=True)
    relay.wait_count(2, "status = 'accepted'", timeout=30)
    time.sleep(1)
    assert payloads(relay) == [f"before-{uid}", f"during-{uid}"]
    assert relay.count() == 2, relay.rows()
    relay.wait_for(lambda: last_status(relay).startswith("STATUS=connected"), 10, "STATUS connected")
    relay.stop()


@pytest.mark.parametrize("client_cert", ["none", "from-another-ca"])
def test_mutual_tls_refused_then_fixed_by_reload(tmp_path, pki, tls_broker, uid, cleanup, client_cert):
    """require_certificate on the broker; the relay has no client
    certificate, or one the broker's CA did not sign: refused, retried, the
    reason given; then the right certificate and a SIGHUP: connected."""
    m = tls_broker(require_certificate=True)
    cert = None if client_cert == "none" else pki.foreign_client
    relay, counter = start_refused(tmp_path, m, uid, cleanup, tls_conf(pki.ca_, cert))
    assert_refused(relay, m, uid, counter, tmp_path,
                   r"certificate (required|unknown)|unknown ca|peer did not return a certificate|"
                   r"certificate verify failed|bad certificate|handshake failure",
                   f"mutual TLS, client certificate: {client_cert}")
    # the fix: the right client certificate, and a reload
    relay.write_config([topic(uid)], broker__port=counter.port, broker__tls=tls_conf(pki.ca_, pki.client))
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_log("subscriptions in place", timeout=20)
    assert_relays_commands(relay, m, uid, n=2)
    relay.stop()


def test_tls_1_1_only_broker_is_refused(tmp_path, pki, tls_broker, uid, cleanup):
    """A listener that speaks only TLS 1.1 (OpenSSL Min/MaxProtocol TLSv1.1,
    SECLEVEL 0, which OpenSSL 3 requires for TLS 1.1) is refused: the relay
    asks for TLS 1.2 or later."""
    m = tls_broker(openssl_conf=openssl_conf(tmp_path, "TLSv1.1", "TLSv1.1", seclevel=0),
                   tls_version="tlsv1.1")
    code, err = tls_connack(m.host, m.tls_port, pki.ca_["pem"], min_version=ssl.TLSVersion.TLSv1_1,
                            max_version=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")
    if code != 0:
        pytest.skip(f"this OpenSSL does not speak TLS 1.1 at all, even at SECLEVEL 0 ({err}); "
                    f"test_plaintext_broker_is_refused covers a listener the relay must refuse")
    code, err = tls_connack(m.host, m.tls_port, pki.ca_["pem"], min_version=ssl.TLSVersion.TLSv1_2)
    assert code is None, f"the TLS 1.1 listener accepted TLS 1.2 ({code}, {err})"
    relay, counter = start_refused(tmp_path, m, uid, cleanup, tls_conf(pki.ca_))
    assert_refused(relay, m, uid, counter, tmp_path,
                   r"protocol version|unsupported protocol|wrong version|no protocols available|TLS ?1\.[01]",
                   "TLS 1.1 only broker")


def test_plaintext_broker_is_refused(tmp_path, pki, tls_broker, uid, cleanup):
    """broker.tls is set but the port speaks plain MQTT: the relay must not
    fall back to plaintext; it is refused, retries, and says it is TLS."""
    m = tls_broker(tls=False)
    assert mqtt_connack(m.host, m.tls_port) == 0, "the plain second listener is broken"
    relay, counter = start_refused(tmp_path, m, uid, cleanup, tls_conf(pki.ca_))
    assert_refused(relay, m, uid, counter, tmp_path, r"TLS|SSL|handshake", "plaintext broker")


# -- configuration ---------------------------------------------------------------

def _conf(tmp_path, broker_port, tls):
    """A relay config (never started by these tests) for a broker on broker_port."""
    return Relay(tmp_path / "conf", SimpleNamespace(host="127.0.0.1", port=broker_port),
                 "gateway-conf", ["/cf/v1/AAA/conf/dev1/set"], broker__tls=tls)


def _check(conf_path):
    return subprocess.run([str(CMDRELAYD), "-t", "-c", str(conf_path)], capture_output=True, text=True,
                          timeout=30, env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})


@pytest.mark.parametrize("which", ["ca_file", "cert_file", "key_file"])
def test_missing_tls_file_is_a_config_error(tmp_path, pki, which):
    """A TLS file that does not exist: `-t` and a real start both exit 78
    naming the key, the file and its line, and the start touches nothing."""
    tls = tls_conf(pki.ca_, pki.client)
    tls[which] = str(tmp_path / "nonexistent" / f"{which}.pem")
    relay = _conf(tmp_path, 1, tls)
    r = _check(relay.conf_path)
    assert r.returncode == EX_CONFIG, (r.returncode, r.stdout, r.stderr)
    line = next(i for i, l in enumerate(relay.conf_path.read_text().splitlines(), 1) if f"{which}:" in l)
    assert f"{relay.conf_path}:{line}:" in r.stderr and f"broker.tls.{which}" in r.stderr, r.stderr
    assert tls[which] in r.stderr, r.stderr
    started = subprocess.run([str(CMDRELAYD), "-c", str(relay.conf_path)], capture_output=True, text=True,
                             timeout=30)
    assert started.returncode == EX_CONFIG, (started.returncode, started.stderr)
    assert f"broker.tls.{which}" in started.stderr, started.stderr
    assert not relay.db_path.exists() and not (relay.workdir / "cmdrelay.sock").exists()


@pytest.mark.parametrize("bad", ["ca-not-a-certificate", "key-of-another-certificate"])
def test_unusable_tls_file_is_named(tmp_path, pki, tls_broker, uid, cleanup, bad):
    """A ca_file that is not a certificate, or a key_file that does not
    belong to cert_file: either `cmdrelayd -t` rejects it (78, naming the
    key), or the running relay says what is wrong with which file — never
    only "a TLS error occurred", forever."""
    m = tls_broker(require_certificate=True)
    if bad == "ca-not-a-certificate":
        junk = tmp_path / "not-a-ca.pem"
        junk.write_text("this is not a PEM certificate\n")
        tls = {**tls_conf(pki.ca_, pki.client), "ca_file": str(junk)}
        key, reason = "ca_file", r"ca_?file|CA certificate|no certificate|PEM|certificate file"
    else:
        tls = {**tls_conf(pki.ca_, pki.client), "key_file": str(pki.server["key"])}
        key, reason = "key_file", r"key.*(match|inconsistent|mismatch)|(match|inconsistent|mismatch).*key"
    relay = make_relay(tmp_path, m, uid, cleanup, tls)
    r = _check(relay.conf_path)
    if r.returncode == EX_CONFIG:
        assert f"broker.tls.{key}" in r.stderr, r.stderr
        return
    assert r.returncode == 0, (r.returncode, r.stderr)
    counter = ConnectCounter(m.host, m.tls_port)
    cleanup(counter.close)
    relay.write_config([topic(uid)], broker__port=counter.port, broker__tls=tls)
    relay.start(wait_subscribed=False)
    try:
        relay.wait_for(lambda: re.search(reason, scrubbed_log(relay, tmp_path), re.I), 10,
                       f"a log line matching /{reason}/")
    except AssertionError as e:
        raise AssertionError(
            f"`cmdrelayd -t` accepted a config whose broker.tls.{key} cannot work, and the running "
            f"relay does not say what is wrong with it ({e})") from None
    assert relay.count() == 0
