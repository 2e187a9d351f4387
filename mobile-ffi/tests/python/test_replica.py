"""The UniFFI surface of syncline-ffi, driven through its generated Python bindings against
real processes: a `syncline-hub` and a `syncline-edge` on 127.0.0.1, real SQLite stores in
temp dirs. Every wait is on a condition with a deadline; every process started is killed.

Run by `cargo test -p syncline-ffi` (mobile-ffi/tests/bindings.rs), which generates the
bindings and sets:
  SYNCLINE_FFI_BINDINGS  folder with syncline_ffi.py and libsyncline_ffi.so
  SYNCLINE_HUB_BIN       the syncline-hub binary
  SYNCLINE_EDGE_BIN      the syncline-edge binary
"""

import http.client
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

sys.path.insert(0, os.environ["SYNCLINE_FFI_BINDINGS"])
import syncline_ffi as sf  # noqa: E402

HUB_BIN = os.environ["SYNCLINE_HUB_BIN"]
EDGE_BIN = os.environ["SYNCLINE_EDGE_BIN"]
WAIT = 30  # seconds: the longest any condition may take


def until(what, check, timeout=WAIT):
    """Polls `check` until it returns a true value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Proc:
    """A process whose stdout lines are read on a thread; killed by `stop`."""

    def __init__(self, args):
        env = dict(os.environ, RUST_LOG="warn", SYNCLINE_LOG="warn")
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    def line_starting(self, prefix, timeout=WAIT):
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no line starting with {prefix!r} within {timeout}s: {seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            seen.append(line)
            if line.startswith(prefix):
                return line

    def stop(self):
        self.popen.kill()
        self.popen.wait(timeout=WAIT)


class Hub:
    def __init__(self, data):
        self.data = str(data)
        self.proc = Proc([HUB_BIN, "run", "--data", self.data, "--listen", "127.0.0.1:0"])
        # listening on ADDR fingerprint FP key KEY
        words = self.proc.line_starting("listening on ").split()
        self.addr, self.fingerprint, self.key = words[2], words[4], words[6]

    def grant(self, key, prefix, mode="rw"):
        subprocess.run(
            [HUB_BIN, "grant", "--data", self.data, key, prefix, mode],
            check=True,
            capture_output=True,
        )

    def config(self, fingerprint=None):
        return sf.HubConfig(
            address=self.addr, fingerprint=fingerprint or self.fingerprint, key=self.key
        )


class Edge:
    """A real edge-node, read and written through its HTTP API."""

    def __init__(self, data, hub):
        out = subprocess.run(
            [EDGE_BIN, "init", "--json", "--data", str(data),
             "--hub", hub.addr, "--hub-fingerprint", hub.fingerprint],
            check=True, capture_output=True, text=True,
        ).stdout
        self.key = json.loads(out)["public_key"]
        hub.grant(self.key, "", "rw")
        self.proc = Proc([EDGE_BIN, "run", "--api", "127.0.0.1:0", "--data", str(data)])
        self.api = self.proc.line_starting("api on ").split()[2]

    def http(self, method, path, body=None):
        host, port = self.api.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        headers = {"content-type": "application/json"} if body is not None else {}
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        data = resp.read().decode()
        conn.close()
        return resp.status, (json.loads(data) if data else None)

    def get(self, doc):
        status, body = self.http("GET", "/v1/docs/" + urllib.parse.quote(doc, safe=""))
        return body["doc"] if status == 200 else None

    def change(self, doc, ops):
        status, body = self.http(
            "POST", "/v1/docs/" + urllib.parse.quote(doc, safe="") + "/changes", {"ops": ops}
        )
        assert status == 200, body

    def subscribe(self, prefix):
        status, body = self.http("POST", "/v1/subscriptions", {"prefix": prefix})
        assert status == 200, body


class Recorder(sf.ReplicaObserver):
    """An observer that keeps what it is told and lets a test wait for a condition on it."""

    def __init__(self):
        self.cond = threading.Condition()
        self.changes = []
        self.statuses = []
        self.lagged = 0

    def on_change(self, change):
        with self.cond:
            self.changes.append(change)
            self.cond.notify_all()

    def on_status(self, status):
        with self.cond:
            self.statuses.append(status)
            self.cond.notify_all()

    def on_lagged(self, missed):
        with self.cond:
            self.lagged += missed
            self.cond.notify_all()

    def wait(self, what, predicate, timeout=WAIT):
        """Waits, woken by the callbacks (no polling), until `predicate(self)` holds."""
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self), timeout=timeout):
                pytest.fail(f"timed out after {timeout}s waiting for {what}; "
                            f"last status {self.statuses[-1:]}, changes {self.changes[-3:]}")

    def status(self):
        return self.statuses[-1] if self.statuses else None


def connected_and_uploaded(rec):
    s = rec.status()
    return s is not None and s.connected and s.pending_uploads == 0


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    h = Hub(tmp_path_factory.mktemp("hub"))
    yield h
    h.proc.stop()


@pytest.fixture(scope="module")
def edge(tmp_path_factory, hub):
    e = Edge(tmp_path_factory.mktemp("edge"), hub)
    e.subscribe("")
    yield e
    e.proc.stop()


@pytest.fixture
def replicas():
    """Replicas opened by a test, shut down after it whatever happens."""
    opened = []
    yield opened
    for r in opened:
        r.shutdown()


def open_replica(replicas, path, hubs=()):
    r = sf.Replica.open(str(path), sf.ReplicaConfig(hubs=list(hubs)))
    replicas.append(r)
    return r


# ---- sync with real processes ----


def test_offline_write_reaches_hub_and_edge_and_edge_changes_arrive_through_the_observer(
    tmp_path, replicas, request
):
    app = open_replica(replicas, tmp_path / "app")
    rec = Recorder()
    app.set_observer(rec)
    rec.wait("the status on setting the observer", lambda r: r.status() is not None)

    # Offline: no hub configured, the write is durable and waits in the outbox.
    doc = "sites/berlin"
    ops = [
        {"op": "put", "path": ["temp"], "value": 21.5},
        {"op": "put", "path": ["stock"], "value": {"$counter": 10}},
    ]
    heads = app.change(doc, json.dumps(ops))
    assert len(heads) == 1 and len(heads[0]) == 64
    assert json.loads(app.get(doc)) == {"temp": 21.5, "stock": 10}
    rec.wait("the local change", lambda r: any(
        c.doc_id == doc and c.origin == sf.ChangeOrigin.LOCAL for c in r.changes))
    local = next(c for c in rec.changes if c.doc_id == doc)
    assert sorted(json.loads(p.path)[0] for p in local.patches) == ["stock", "temp"]
    status = app.status()
    assert (status.syncing, status.connected, status.pending_uploads) == (False, False, 1)

    # A hub appears (the first test to ask starts the hub and edge processes): grant the
    # app's key, configure, start sync.
    hub = request.getfixturevalue("hub")
    edge = request.getfixturevalue("edge")
    hub.grant(app.public_key(), "sites/", "rw")
    app.set_hubs([hub.config()])
    app.start_sync()
    rec.wait("connected with the outbox uploaded", connected_and_uploaded)
    assert rec.status().hub == hub.addr and rec.status().hub_key == hub.key

    # The offline write reached the hub and, through it, a real edge-node.
    until("the write at the edge", lambda: edge.get(doc) == {"temp": 21.5, "stock": 10})

    # A change made at the edge arrives through the observer.
    edge.change(doc, [{"op": "increment", "path": ["stock"], "by": -3}])
    rec.wait("the edge's change through the observer", lambda r: any(
        c.doc_id == doc and c.origin == sf.ChangeOrigin.REMOTE
        and any(p.action == "increment" and json.loads(p.path) == ["stock"] for p in c.patches)
        for c in r.changes))
    assert json.loads(app.get(doc)) == {"temp": 21.5, "stock": 7}
    assert app.heads(doc) == edge.http("GET", "/v1/docs/" + urllib.parse.quote(doc, safe=""))[1]["heads"]

    # A document written at the edge under a subscribed prefix arrives too.
    app.subscribe("sites/")
    edge.change("sites/oslo", [{"op": "put", "path": ["temp"], "value": 3}])
    rec.wait("a new document from the edge", lambda r: any(c.doc_id == "sites/oslo" for c in r.changes))
    assert sorted(app.docs()) == ["sites/berlin", "sites/oslo"]

    now = app.sync_now(10_000)
    assert now.caught_up, now
    assert "prefix:sites/" in now.synced


def test_stop_sync_goes_offline_and_start_sync_uploads_what_waited(tmp_path, hub, edge, replicas):
    app = open_replica(replicas, tmp_path / "app", [hub.config()])
    hub.grant(app.public_key(), "fleet/", "rw")
    rec = Recorder()
    app.set_observer(rec)
    app.start_sync()
    rec.wait("connected", lambda r: r.status() is not None and r.status().connected)

    # The app goes to the background: the session ends, and the observer is told.
    app.stop_sync()
    rec.wait("disconnected after stop_sync", lambda r: not r.status().connected and not r.status().syncing)
    app.change("fleet/truck-7", json.dumps([{"op": "put", "path": ["km"], "value": 1200}]))
    rec.wait("the offline write pending", lambda r: r.status().pending_uploads == 1)
    assert not app.status().connected

    # Back to the foreground.
    app.start_sync()
    rec.wait("the write uploaded after start_sync", connected_and_uploaded)
    until("the write at the edge", lambda: edge.get("fleet/truck-7") == {"km": 1200})

    # sync_now when stopped starts sync and returns once caught up.
    app.stop_sync()
    app.change("fleet/truck-7", json.dumps([{"op": "put", "path": ["km"], "value": 1300}]))
    status = app.sync_now(15_000)
    assert status.caught_up and status.pending_uploads == 0, status
    until("the second write at the edge", lambda: edge.get("fleet/truck-7") == {"km": 1300})
    # The largest timeout is taken (cut to a day), not an overflow.
    assert app.sync_now(2**64 - 1).caught_up
    app.stop_sync()
    app.stop_sync()  # harmless


def test_reopening_the_store_finds_everything(tmp_path, hub, edge, replicas):
    path = tmp_path / "app"
    app = open_replica(replicas, path, [hub.config()])
    key = app.public_key()
    hub.grant(key, "notes/", "rw")
    app.subscribe("notes/")
    app.change("notes/mine", json.dumps([{"op": "put", "path": ["text"], "value": {"$text": "hello"}}]))
    edge.change("notes/theirs", [{"op": "put", "path": ["n"], "value": 1}])
    app.start_sync()
    until("the edge's note to arrive", lambda: "notes/theirs" in app.docs())
    until("the outbox to drain", lambda: app.status().pending_uploads == 0)
    # An offline write just before the app is killed.
    app.stop_sync()
    app.change("notes/mine", json.dumps([{"op": "splice", "path": ["text"], "index": 5, "text": " world"}]))
    app.shutdown()
    with pytest.raises(sf.SynclineError.Closed):
        app.docs()

    # The app restarts.
    again = open_replica(replicas, path, [hub.config()])
    assert again.public_key() == key
    assert sorted(again.docs()) == ["notes/mine", "notes/theirs"]
    assert json.loads(again.get("notes/mine")) == {"text": "hello world"}
    assert json.loads(again.get("notes/theirs")) == {"n": 1}
    status = again.status()
    assert status.pending_uploads == 1 and "prefix:notes/" in status.subscriptions, status
    # It resumes: the write kept through the restart reaches the edge.
    edge.subscribe("notes/")
    again.start_sync()
    until("the kept write at the edge", lambda: edge.get("notes/mine") == {"text": "hello world"})


def test_a_wrong_fingerprint_refuses_the_hub_and_uploads_nothing(tmp_path, hub, replicas):
    wrong = ("0" if hub.fingerprint[0] != "0" else "1") + hub.fingerprint[1:]
    app = open_replica(replicas, tmp_path / "app", [hub.config(fingerprint=wrong)])
    hub.grant(app.public_key(), "wrong/", "rw")
    app.change("wrong/doc", json.dumps([{"op": "put", "path": ["x"], "value": 1}]))
    rec = Recorder()
    app.set_observer(rec)
    app.start_sync()
    rec.wait("a refused connection", lambda r: r.status() is not None
             and r.status().last_error is not None and "fingerprint" in r.status().last_error)
    status = app.status()
    assert not status.connected and status.pending_uploads == 1


# ---- bad input: typed errors with clear messages ----


def test_bad_document_ids_are_refused(tmp_path, replicas):
    app = open_replica(replicas, tmp_path / "app")
    for bad in ["", "a//b", "/a", "a/../b", "a b", "x" * 300]:
        with pytest.raises(sf.SynclineError.InvalidDocId) as e:
            app.change(bad, '[{"op":"put","path":["a"],"value":1}]')
        assert "invalid document id" in str(e.value)
    with pytest.raises(sf.SynclineError.InvalidDocId):
        app.get("a//b")
    with pytest.raises(sf.SynclineError.InvalidDocId):
        app.subscribe("bad prefix")
    assert app.docs() == []


def test_bad_operations_are_refused_and_change_nothing(tmp_path, replicas):
    app = open_replica(replicas, tmp_path / "app")
    app.change("d", '[{"op":"put","path":["a"],"value":1}]')
    heads = app.heads("d")
    cases = [
        ("not json", sf.SynclineError.InvalidOperation, "not a JSON list"),
        ('{"op":"put"}', sf.SynclineError.InvalidOperation, "not a JSON list"),
        ('[{"op":"frobnicate","path":["a"]}]', sf.SynclineError.InvalidOperation, "frobnicate"),
        ("[]", sf.SynclineError.InvalidOperation, "no operations"),
        ('[{"op":"increment","path":["missing"],"by":1}]', sf.SynclineError.InvalidPath, "missing"),
        # All or nothing: a good op before a bad one is not applied.
        ('[{"op":"put","path":["b"],"value":2},{"op":"delete","path":["nope"]}]',
         sf.SynclineError.InvalidPath, "nope"),
    ]
    for ops, error, needle in cases:
        with pytest.raises(error) as e:
            app.change("d", ops)
        assert needle in str(e.value), str(e.value)
    assert json.loads(app.get("d")) == {"a": 1}
    assert app.heads("d") == heads
    with pytest.raises(sf.SynclineError.UnknownDocument) as e:
        app.get("never/written")
    assert "never/written" in str(e.value)


def test_bad_hub_settings_are_refused(tmp_path, replicas):
    fp = "ab" * 32
    cases = [
        (sf.HubConfig(address="127.0.0.1:4433", fingerprint="abc"), "fingerprint"),
        (sf.HubConfig(address="no-port", fingerprint=fp), "HOST:PORT"),
        (sf.HubConfig(address="127.0.0.1:4433", fingerprint=fp, key="xyz"), "hub key"),
    ]
    for hub_config, needle in cases:
        with pytest.raises(sf.SynclineError.InvalidConfig) as e:
            sf.Replica.open(str(tmp_path / "bad"), sf.ReplicaConfig(hubs=[hub_config]))
        assert needle in str(e.value), str(e.value)
    app = open_replica(replicas, tmp_path / "app")
    with pytest.raises(sf.SynclineError.InvalidConfig) as e:
        app.start_sync()
    assert "no hub configured" in str(e.value)
    with pytest.raises(sf.SynclineError.InvalidConfig):
        app.set_hubs([cases[0][0]])
    with pytest.raises(sf.SynclineError.InvalidConfig):
        sf.Replica.open("", sf.ReplicaConfig())


def test_a_store_open_twice_is_locked_until_shut_down(tmp_path, replicas):
    path = str(tmp_path / "app")
    first = open_replica(replicas, path)
    first.change("d", '[{"op":"put","path":["a"],"value":1}]')
    with pytest.raises(sf.SynclineError.Locked) as e:
        sf.Replica.open(path, sf.ReplicaConfig())
    assert "already open" in str(e.value)
    first.shutdown()
    first.shutdown()  # harmless
    for call in (lambda: first.get("d"), first.start_sync, first.status):
        with pytest.raises(sf.SynclineError.Closed):
            call()
    second = open_replica(replicas, path)
    assert json.loads(second.get("d")) == {"a": 1}


def test_an_encrypted_store_is_unreadable_without_its_key(tmp_path, replicas):
    path = tmp_path / "app"
    key = bytes(range(32))
    marker = "phone-secret-93be"
    app = sf.Replica.open(str(path), sf.ReplicaConfig(store_key=key))
    app.change("vault", json.dumps([{"op": "put", "path": ["pin"], "value": marker}]))
    app.shutdown()
    for f in ("replica.db", "replica.db-wal"):
        p = path / f
        if p.exists():
            assert marker.encode() not in p.read_bytes(), f
    with pytest.raises(sf.SynclineError.InvalidConfig) as e:
        sf.Replica.open(str(path), sf.ReplicaConfig())
    assert "encrypted" in str(e.value)
    with pytest.raises(sf.SynclineError.InvalidConfig) as e:
        sf.Replica.open(str(path), sf.ReplicaConfig(store_key=bytes(32)))
    assert "does not open" in str(e.value)
    with pytest.raises(sf.SynclineError.InvalidConfig) as e:
        sf.Replica.open(str(path), sf.ReplicaConfig(store_key=b"short"))
    assert "32 random bytes" in str(e.value)
    again = sf.Replica.open(str(path), sf.ReplicaConfig(store_key=key))
    replicas.append(again)
    assert json.loads(again.get("vault")) == {"pin": marker}


def test_an_observer_that_throws_does_not_break_the_replica(tmp_path, replicas):
    app = open_replica(replicas, tmp_path / "app")

    class Throwing(sf.ReplicaObserver):
        def on_change(self, change):
            raise RuntimeError("app bug")

        def on_status(self, status):
            raise RuntimeError("app bug")

        def on_lagged(self, missed):
            raise RuntimeError("app bug")

    app.set_observer(Throwing())
    app.change("d", '[{"op":"put","path":["a"],"value":1}]')
    rec = Recorder()
    app.set_observer(rec)
    app.change("d", '[{"op":"put","path":["a"],"value":2}]')
    rec.wait("the next change delivered", lambda r: any(c.doc_id == "d" for c in r.changes))
    assert json.loads(app.get("d")) == {"a": 2}
