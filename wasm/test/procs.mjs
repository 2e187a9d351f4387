// Test support: real syncline-hub and syncline-edge processes on 127.0.0.1, in temp dirs.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const HUB_BIN = process.env.SYNCLINE_HUB_BIN ?? join(root, 'target', 'debug', 'syncline-hub');
export const EDGE_BIN = process.env.SYNCLINE_EDGE_BIN ?? join(root, 'target', 'debug', 'syncline-edge');

/** Waits until `f()` gives a truthy value (awaited), or fails after `ms` saying `what`. */
export async function until(what, ms, f) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const v = await f();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export function tempDir(prefix) {
  return mkdtempSync(join(tmpdir(), `syncline-${prefix}-`));
}

/** A child process whose stdout lines can be awaited. */
class Proc {
  constructor(bin, args) {
    this.child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.lines = [];
    this.waiters = [];
    this.stderr = '';
    this.child.stderr.on('data', (d) => { this.stderr = (this.stderr + d).slice(-20000); });
    createInterface({ input: this.child.stdout }).on('line', (l) => {
      this.lines.push(l);
      for (const w of this.waiters) w();
    });
    this.exited = new Promise((r) => this.child.on('exit', (code, sig) => r({ code, sig })));
  }
  line(prefix, ms = 30000) {
    return until(`a line starting ${JSON.stringify(prefix)} (stderr: ${this.stderr.slice(-2000)})`, ms,
      () => this.lines.find((l) => l.startsWith(prefix)));
  }
  async kill(sig = 'SIGTERM') {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill(sig);
    await this.exited;
  }
}

/** A free port on 127.0.0.1 (`udp` for QUIC). */
export async function freePort(udp = false) {
  if (udp) {
    const { createSocket } = await import('node:dgram');
    const s = createSocket('udp4');
    await new Promise((r) => s.bind(0, '127.0.0.1', r));
    const { port } = s.address();
    await new Promise((r) => s.close(r));
    return port;
  }
  const { createServer } = await import('node:net');
  const s = createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

export class Hub {
  /**
   * Starts a hub with the WebSocket endpoint on. `fixed` picks its ports once, so that a
   * restart comes back on the same addresses (for edges and browsers that reconnect).
   */
  static async start({ data = tempDir('hub'), fixed = false, tls = false } = {}) {
    const hub = new Hub();
    hub.data = data;
    hub.tls = tls;
    hub.listen = fixed ? `127.0.0.1:${await freePort(true)}` : '127.0.0.1:0';
    hub.ws = fixed ? `127.0.0.1:${await freePort()}` : '127.0.0.1:0';
    await hub.run();
    return hub;
  }
  /** Starts the process (again, after a stop: same data, same addresses if `fixed`). */
  async run() {
    this.proc = new Proc(HUB_BIN, ['run', '--data', this.data, '--listen', this.listen, '--ws', this.ws,
      ...(this.tls ? ['--ws-tls'] : [])]);
    [, , this.addr, , this.fingerprint, , this.key] = (await this.proc.line('listening on ')).split(' ');
    this.url = (await this.proc.line('websocket on ')).split(' ')[2];
  }
  grant(key, prefix = '', mode = 'rw') {
    execFileSync(HUB_BIN, ['grant', '--data', this.data, key, prefix, mode], { stdio: 'pipe' });
  }
  stop(sig) { return this.proc.kill(sig); }
  remove() { rmSync(this.data, { recursive: true, force: true }); }
}

export class Edge {
  static async start(hub, { data = tempDir('edge') } = {}) {
    const edge = new Edge();
    edge.data = data;
    const init = JSON.parse(execFileSync(EDGE_BIN, ['init', '--json', '--data', data,
      '--hub', hub.addr, '--hub-fingerprint', hub.fingerprint], { encoding: 'utf8' }));
    edge.key = init.public_key;
    hub.grant(edge.key);
    edge.proc = new Proc(EDGE_BIN, ['run', '--api', '127.0.0.1:0', '--data', data]);
    edge.api = `http://${(await edge.proc.line('api on ')).split(' ')[2]}`;
    return edge;
  }
  async req(method, path, body) {
    const r = await fetch(this.api + path, {
      method,
      headers: body ? { 'content-type': 'application/json' } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await r.text();
    return { status: r.status, body: text ? JSON.parse(text) : null };
  }
  async change(doc, ops) {
    const r = await this.req('POST', `/v1/docs/${encodeURIComponent(doc)}/changes`, { ops });
    if (r.status !== 200) throw new Error(`edge change: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  }
  /** The document's JSON, or null if the edge does not have it. */
  async json(doc) {
    const r = await this.req('GET', `/v1/docs/${encodeURIComponent(doc)}`);
    if (r.status === 404) return null;
    if (r.status !== 200) throw new Error(`edge get: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body.doc;
  }
  async subscribe(prefix) {
    const r = await this.req('POST', '/v1/subscriptions', { prefix });
    if (r.status !== 200) throw new Error(`edge subscribe: ${r.status}`);
  }
  stop(sig) { return this.proc.kill(sig); }
  remove() { rmSync(this.data, { recursive: true, force: true }); }
}
