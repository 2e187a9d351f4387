// Syncline in the browser: local-first documents that sync through a Syncline hub.
//
//   import { Repo } from 'syncline-wasm';
//   const repo = await Repo.open({ name: 'board', hub: 'wss://hub.example.org/v1/sync' });
//   const doc = await repo.find('sites/berlin/inventory');
//   await doc.change([{ op: 'increment', path: ['bolts'], by: -2 }]);
//   doc.on('change', async () => render(await doc.json()));
//
// Writes are durable when their promise resolves (SQLite on OPFS, in a worker), work offline,
// and are uploaded when the hub is reachable. Every change is signed here with this browser's
// key and every change received is verified before it is stored.
import { Host } from './host.js';
import { loadEngine } from './load.js';

const inBrowser = typeof window !== 'undefined';

function fail(message) {
  throw new TypeError(message);
}

function checkDocId(id) {
  if (typeof id !== 'string' || id.length === 0) {
    fail(`a document id must be a non-empty string, not ${describe(id)}`);
  }
}

function checkOps(ops) {
  if (!Array.isArray(ops)) fail(`operations must be an array of {op, path, ...} objects, not ${describe(ops)}`);
  ops.forEach((o, i) => {
    if (o === null || typeof o !== 'object' || Array.isArray(o)) fail(`operation ${i} must be an object, not ${describe(o)}`);
    if (typeof o.op !== 'string') fail(`operation ${i} needs "op" (put, delete, insert, increment, splice...)`);
    if (!Array.isArray(o.path)) fail(`operation ${i} needs "path", an array of keys and indexes`);
  });
}

function describe(v) {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  return typeof v === 'string' ? JSON.stringify(v) : `a ${typeof v}`;
}

/** Calls into a Host in this thread (Node, memory storage). */
class Inline {
  constructor(host) { this.host = host; }
  async call(method, args) { return this.host.call(method, args); }
}

/** Calls into the package's worker. */
class Remote {
  constructor(worker, onEvent) {
    this.worker = worker;
    this.next = 1;
    this.waiting = new Map();
    worker.onmessage = ({ data }) => {
      if (data.event) return onEvent(data.event);
      const w = this.waiting.get(data.id);
      if (!w) return;
      this.waiting.delete(data.id);
      if ('error' in data) w.reject(new Error(data.error));
      else w.resolve(data.result);
    };
    worker.onerror = (e) => {
      const err = new Error(`the Syncline worker failed: ${e.message ?? e}`);
      for (const w of this.waiting.values()) w.reject(err);
      this.waiting.clear();
    };
  }
  send(msg) {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.worker.postMessage({ id, ...msg });
    });
  }
  call(method, args) { return this.send({ method, args }); }
}

export class Repo {
  /**
   * Opens (or creates) the replica named `name` in this origin's storage.
   * Options: `name` (letters, digits, - and _), `hub` (`ws://` or `wss://` URL of the hub's
   * /v1/sync endpoint; absent: local only), `hubKey` (the hub's public key, hex: pinned in
   * the handshake), `storage` (`"opfs"`, the default in browsers, or `"memory"`).
   */
  static async open(options) {
    if (options === null || typeof options !== 'object') fail('Repo.open takes an options object: { name, hub, hubKey, storage }');
    const { name, hub, hubKey } = options;
    const storage = options.storage ?? (inBrowser ? 'opfs' : 'memory');
    if (typeof name !== 'string') fail(`"name" must be a string, not ${describe(name)}`);
    if (hub !== undefined && hub !== null && (typeof hub !== 'string' || !/^wss?:\/\//.test(hub))) {
      fail(`"hub" must be a ws:// or wss:// URL (such as wss://hub.example.org/v1/sync), not ${describe(hub)}`);
    }
    if (hubKey !== undefined && hubKey !== null && (typeof hubKey !== 'string' || !/^[0-9a-f]{64}$/.test(hubKey))) {
      fail(`"hubKey" must be the hub's public key, 64 lowercase hex characters, not ${describe(hubKey)}`);
    }
    if (storage !== 'opfs' && storage !== 'memory') fail(`"storage" must be "opfs" or "memory", not ${describe(storage)}`);
    const repo = new Repo();
    const config = { name, storage, hub: hub ?? null, hubKey: hubKey ?? null };
    if (storage === 'opfs') {
      if (typeof Worker === 'undefined') fail('OPFS storage needs a browser with workers; use storage: "memory" here');
      const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
      repo.link = new Remote(worker, (ev) => repo.dispatch(ev));
      try {
        repo.peerId = await repo.link.send({ open: config });
      } catch (e) {
        worker.terminate();
        throw e;
      }
    } else {
      const Engine = await loadEngine();
      const engine = await Host.open(Engine, config);
      const host = new Host(engine, { ...config, WebSocket: options.WebSocket, onEvent: (ev) => repo.dispatch(ev) });
      repo.link = new Inline(host);
      repo.peerId = engine.peerId();
    }
    return repo;
  }

  constructor() {
    this.listeners = new Map();
    this.lastStatus = null;
    this.closed = false;
  }

  dispatch(ev) {
    if (ev.type === 'status') this.lastStatus = ev.status;
    for (const cb of this.listeners.get(ev.type) ?? []) {
      try { cb(ev.type === 'status' ? ev.status : ev); } catch (e) { console.error(e); }
    }
  }

  call(method, args = []) {
    if (this.closed) return Promise.reject(new Error('the repo is closed'));
    return this.link.call(method, args);
  }

  /**
   * Listens to `change` (any document), `status` (connected, outbox...), `error` (refused
   * input from the hub, transport failures), `rejected`, `synced`, `acknowledged`.
   * Returns a function that stops listening.
   */
  on(type, cb) {
    if (typeof cb !== 'function') fail('on(type, callback): the callback must be a function');
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(cb);
    return () => this.listeners.get(type)?.delete(cb);
  }

  /** The document `id`, subscribed to so that the hub sends its changes. */
  async find(id) {
    checkDocId(id);
    await this.call('subscribe', [`doc:${id}`]);
    return new DocHandle(this, id);
  }

  /** Subscribes to every document whose id starts with `prefix`. */
  async subscribePrefix(prefix) {
    if (typeof prefix !== 'string') fail(`a prefix must be a string, not ${describe(prefix)}`);
    await this.call('subscribe', [`prefix:${prefix}`]);
  }

  /** The ids of the documents stored here. */
  docIds() { return this.call('docIds'); }

  /** { online, connected, hub, outbox, rejected, synced, subscriptions, lastError } */
  status() { return this.call('status'); }

  /** Ends the session and releases the storage (another tab may open it then). */
  async close() {
    if (this.closed) return;
    await this.call('close');
    this.closed = true;
    this.link.worker?.terminate();
  }
}

export class DocHandle {
  constructor(repo, id) {
    this.repo = repo;
    this.id = id;
  }

  /** Applies operations; resolves with the new heads once the change is stored durably. */
  change(ops) {
    try { checkOps(ops); } catch (e) { return Promise.reject(e); }
    return this.repo.call('change', [this.id, ops]);
  }

  /** The document as a plain object, or null while this replica does not hold it. */
  json() { return this.repo.call('json', [this.id]); }

  /** The document's heads (hex change hashes). */
  heads() { return this.repo.call('heads', [this.id]); }

  /** Calls `cb({doc, origin, heads, patches})` on each change of this document. */
  on(type, cb) {
    if (type !== 'change') fail(`a document emits "change" only, not ${describe(type)}`);
    return this.repo.on('change', (ev) => { if (ev.doc === this.id) cb(ev); });
  }
}
