"""Numbers for docs/BENCHMARKS.md, "Mobile library (issue 6)": the time to open a store of
1,000 documents and the memory of an idle replica, measured through the generated Python
bindings (the same UniFFI surface as Kotlin and Swift). Run by mobile-ffi/bench/run.sh.

    python3 bench.py BINDINGS_DIR HUB_BIN
    python3 bench.py --idle BINDINGS_DIR HUB_BIN STORE_DIR   (one idle measurement; run by the
                                                             first form in fresh processes)

BINDINGS_DIR holds syncline_ffi.py and the (release) libsyncline_ffi.so.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

DOCS = 1000
RUNS = 20
IDLE_SECONDS = 10


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def cpu_seconds():
    """User + system CPU time of this process (all threads)."""
    t = os.times()
    return t.user + t.system


def threads():
    return len(os.listdir("/proc/self/task"))


def ms(xs):
    xs = sorted(xs)
    return f"median {statistics.median(xs) * 1000:.2f} ms (min {xs[0] * 1000:.2f}, max {xs[-1] * 1000:.2f})"


def main():
    bindings, hub_bin = sys.argv[1], sys.argv[2]
    sys.path.insert(0, bindings)
    import syncline_ffi as sf

    work = tempfile.mkdtemp(prefix="syncline-bench-")
    store = os.path.join(work, "app")

    # A store of 1,000 small documents (one change each, committed one by one).
    r = sf.Replica.open(store, sf.ReplicaConfig())
    key = r.public_key()
    for i in range(DOCS):
        r.change(f"bench/doc-{i:04}", json.dumps([
            {"op": "put", "path": ["n"], "value": i},
            {"op": "put", "path": ["name"], "value": f"item {i}"},
        ]))
    r.shutdown()
    db = os.path.getsize(os.path.join(store, "replica.db"))
    wal = os.path.join(store, "replica.db-wal")
    db += os.path.getsize(wal) if os.path.exists(wal) else 0

    # Open (and close) it RUNS times; also list the documents and read every one as JSON.
    opens, lists, reads = [], [], []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        r = sf.Replica.open(store, sf.ReplicaConfig())
        t1 = time.perf_counter()
        ids = r.docs()
        t2 = time.perf_counter()
        for d in ids:
            r.get(d)
        t3 = time.perf_counter()
        assert len(ids) == DOCS
        r.shutdown()
        opens.append(t1 - t0)
        lists.append(t2 - t1)
        reads.append(t3 - t2)

    # Idle memory, each in a fresh process (the runs above grew this one's heap).
    empty = idle_child(bindings, hub_bin, os.path.join(work, "empty"))
    full = idle_child(bindings, hub_bin, store)

    print(f"store of {DOCS} documents: {db / 1024:.0f} KiB on disk")
    print(f"open ({RUNS} runs): {ms(opens)}")
    print(f"docs() after open: {ms(lists)}")
    print(f"get() of all {DOCS} documents after open: {ms(reads)}")
    for name, r in (("empty replica", empty), (f"{DOCS}-document replica", full)):
        mb = lambda kb: f"{kb / 1024:.1f} MiB"
        print(f"{name}: RSS python alone {mb(r['python'])}, after import {mb(r['import'])}, "
              f"opened {mb(r['opened'])}, synced {mb(r['synced'])} "
              f"(sync_now {r['sync_ms']:.0f} ms, {r['uploaded']} uploaded), "
              f"idle {IDLE_SECONDS} s {mb(r['idle'])} = python + {mb(r['idle'] - r['python'])}; "
              f"{r['threads']} threads; CPU while idle {r['idle_cpu_ms']:.0f} ms")


def idle_child(bindings, hub_bin, store):
    out = subprocess.run(
        [sys.executable, __file__, "--idle", bindings, hub_bin, store],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def idle(bindings, hub_bin, store):
    """In a fresh process: a real hub, the replica at `store` opened and synced (its documents
    uploaded), then idle. Prints one JSON line."""
    r = {"python": status_kb("VmRSS")}
    sys.path.insert(0, bindings)
    import syncline_ffi as sf

    r["import"] = status_kb("VmRSS")
    hub_dir = tempfile.mkdtemp(prefix="syncline-bench-hub-")
    hub = subprocess.Popen(
        [hub_bin, "run", "--data", hub_dir, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        words = hub.stdout.readline().split()  # listening on ADDR fingerprint FP key KEY
        addr, fingerprint, hub_key = words[2], words[4], words[6]
        config = sf.ReplicaConfig(hubs=[sf.HubConfig(address=addr, fingerprint=fingerprint,
                                                     key=hub_key)])
        replica = sf.Replica.open(store, config)
        subprocess.run([hub_bin, "grant", "--data", hub_dir, replica.public_key(), "", "rw"],
                       check=True, capture_output=True)
        r["opened"] = status_kb("VmRSS")
        pending = replica.status().pending_uploads
        t0 = time.perf_counter()
        st = replica.sync_now(60_000)
        r["sync_ms"] = (time.perf_counter() - t0) * 1000
        assert st.caught_up and st.pending_uploads == 0, st
        r["uploaded"] = pending
        r["synced"] = status_kb("VmRSS")
        cpu0 = cpu_seconds()
        time.sleep(IDLE_SECONDS)
        r["idle_cpu_ms"] = (cpu_seconds() - cpu0) * 1000
        r["idle"] = status_kb("VmRSS")
        r["threads"] = threads()
        assert replica.status().connected
        replica.shutdown()
    finally:
        hub.kill()
        hub.wait()
    print(json.dumps(r))


if __name__ == "__main__":
    if sys.argv[1] == "--idle":
        idle(*sys.argv[2:5])
    else:
        main()
