// The engine's host: owns one wasm Engine, the WebSocket to the hub and the reconnect timer.
// It runs in the package's dedicated worker (browsers) or in the caller's thread (Node,
// memory storage). Everything an app calls arrives here as `call(method, args)`.

const MAX_BUFFERED = 4 * 1024 * 1024; // stop sending while the socket holds this much
const BACKOFF_MIN = 200;
const BACKOFF_MAX = 10_000;

// Runs `f` as a new task, after the tasks already queued (the app's queued calls among them),
// without the 4 ms clamp browsers put on nested `setTimeout(0)`: that clamp alone was a
// third of a write's latency in the browser.
const nextTask = typeof setImmediate === 'function'
  ? setImmediate
  : (() => {
      const channel = new MessageChannel();
      const queue = [];
      channel.port1.onmessage = () => queue.shift()?.();
      return (f) => {
        queue.push(f);
        channel.port2.postMessage(null);
      };
    })();

export class Host {
  /**
   * @param {object} engine a wasm `Engine`
   * @param {object} opts { hub, hubKey, WebSocket, onEvent }
   */
  constructor(engine, opts) {
    this.engine = engine;
    this.hub = opts.hub ?? null;
    this.hubKey = opts.hubKey ?? null;
    this.WebSocket = opts.WebSocket ?? globalThis.WebSocket;
    this.onEvent = opts.onEvent ?? (() => {});
    this.ws = null;
    this.closed = false;
    this.backoff = BACKOFF_MIN;
    this.timer = null;
    this.repump = null;
    this.lastError = null;
    if (this.hub) {
      if (!this.WebSocket) {
        throw new Error('no WebSocket here: pass one as the `WebSocket` option (Node 20: run with --experimental-websocket)');
      }
      this.connectSoon(0);
    }
  }

  /** Opens the engine, retrying while a page being reloaded still holds the storage. */
  static async open(Engine, { name, storage }) {
    const deadline = Date.now() + 5000;
    for (;;) {
      try {
        return await Engine.open(name, storage);
      } catch (e) {
        const busy = storage === 'opfs' && /another tab or worker/.test(String(e?.message));
        if (!busy || Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 200));
      }
    }
  }

  connectSoon(delay) {
    if (this.closed || this.timer !== null) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.connect();
    }, delay);
  }

  connect() {
    if (this.closed) return;
    let ws;
    try {
      ws = new this.WebSocket(this.hub);
    } catch (e) {
      this.lastError = `connecting to ${this.hub}: ${e?.message ?? e}`;
      this.scheduleRetry();
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      try {
        this.engine.connect(this.hubKey);
      } catch (e) {
        this.fail(ws, e);
        return;
      }
      this.emitStatus();
      this.pump();
    };
    ws.onmessage = (m) => {
      if (this.ws !== ws) return;
      if (typeof m.data === 'string') {
        this.fail(ws, new Error('the hub sent a text message; frames are binary'));
        return;
      }
      try {
        this.engine.handleFrame(new Uint8Array(m.data));
      } catch (e) {
        // A bad frame or a forged change: nothing of it was stored. The engine's error for
        // the hub (if any) goes out, then the session ends; the retry timer starts over.
        this.lastError = String(e?.message ?? e);
        this.onEvent({ type: 'error', message: this.lastError });
        this.pump();
        try { ws.close(); } catch { /* closing already */ }
        return;
      }
      this.pump();
    };
    ws.onerror = () => {
      if (this.ws === ws) this.lastError = `the connection to ${this.hub} failed`;
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.engine.disconnect();
      this.drainEvents();
      this.emitStatus();
      this.scheduleRetry();
    };
  }

  fail(ws, e) {
    this.lastError = String(e?.message ?? e);
    this.onEvent({ type: 'error', message: this.lastError });
    try { ws.close(); } catch { /* already closed */ }
  }

  scheduleRetry() {
    if (this.closed) return;
    const jitter = Math.random() * this.backoff * 0.2;
    this.connectSoon(this.backoff + jitter);
    this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX);
  }

  /** Sends what the engine has to say while the socket has room; then hands out events. */
  pump() {
    const ws = this.ws;
    if (ws && ws.readyState === 1) {
      try {
        while (ws.bufferedAmount < MAX_BUFFERED) {
          const frame = this.engine.pollTransmit();
          if (!frame) break;
          ws.send(frame);
        }
        if (ws.bufferedAmount >= MAX_BUFFERED && !this.repump) {
          // The socket is full: look again soon (WebSocket has no "drained" event).
          this.repump = setTimeout(() => { this.repump = null; this.pump(); }, 20);
        }
        if (this.engine.sessionFailed()) ws.close();
      } catch (e) {
        this.fail(ws, e);
      }
    }
    this.drainEvents();
  }

  drainEvents() {
    for (;;) {
      const text = this.engine.pollEvent();
      if (text === undefined || text === null) return;
      const ev = JSON.parse(text);
      if (ev.type === 'connected') {
        this.backoff = BACKOFF_MIN;
        this.lastError = null;
      }
      this.onEvent(ev);
      if (ev.type === 'connected' || ev.type === 'acknowledged') this.emitStatus();
    }
  }

  emitStatus() {
    try {
      this.onEvent({ type: 'status', status: this.status() });
    } catch { /* closed */ }
  }

  status() {
    const s = JSON.parse(this.engine.status());
    s.online = this.ws !== null && this.ws.readyState === 1;
    s.lastError = this.lastError;
    return s;
  }

  /** One call from the app. Returns a structured-cloneable value or throws an Error. */
  call(method, args) {
    if (this.closed) throw new Error('the repo is closed');
    // Calls take effect in the order they were made: a read after a write sees it.
    if (method !== 'change' && this.batch?.length) this.commitBatch();
    const e = this.engine;
    switch (method) {
      case 'peerId':
        return e.peerId();
      case 'change':
        return this.queueChange(args[0], args[1]);
      case 'json':
        return JSON.parse(e.json(args[0]));
      case 'heads':
        return JSON.parse(e.heads(args[0]));
      case 'docIds':
        return JSON.parse(e.docIds());
      case 'subscribe':
        e.subscribe(args[0]);
        this.pump();
        return null;
      case 'status':
        return this.status();
      case 'close':
        this.close();
        return null;
      default:
        throw new Error(`unknown call ${method}`);
    }
  }

  /**
   * Writes that arrive together commit together: the first one schedules a commit as the next
   * task, and every write already queued by then goes into the same
   * transaction (one durable OPFS commit instead of one each). Each caller's promise resolves
   * after the commit, with its document's heads then.
   */
  queueChange(doc, ops) {
    return new Promise((resolve, reject) => {
      this.batch ??= [];
      this.batch.push({ doc, ops, resolve, reject });
      if (this.batch.length === 1) nextTask(() => this.commitBatch());
    });
  }

  commitBatch() {
    const batch = this.batch ?? [];
    this.batch = [];
    if (batch.length === 0) return;
    if (this.closed) {
      for (const w of batch) w.reject(new Error('the repo is closed'));
      return;
    }
    const one = (w) => {
      try {
        w.resolve(JSON.parse(this.engine.change(w.doc, JSON.stringify(w.ops))));
      } catch (err) {
        w.reject(err);
      }
    };
    if (batch.length === 1) {
      one(batch[0]);
    } else {
      try {
        const heads = JSON.parse(this.engine.changeMany(JSON.stringify(batch.map((w) => [w.doc, w.ops]))));
        batch.forEach((w, i) => w.resolve(heads[i]));
      } catch {
        // One bad write refuses the whole transaction: commit them one by one, so that each
        // caller gets its own result.
        batch.forEach(one);
      }
    }
    this.pump();
  }

  close() {
    if (this.closed) return;
    this.commitBatch(); // writes queued before close are committed, not dropped
    this.closed = true;
    clearTimeout(this.timer);
    clearTimeout(this.repump);
    const ws = this.ws;
    this.ws = null;
    if (ws) try { ws.close(); } catch { /* ignore */ }
    this.engine.disconnect();
    this.engine.free();
  }
}
