// The package in a real headless Chromium (Debian's chromium, driven by playwright-core),
// against real hub and edge-node processes: sync both ways, two browser contexts converging,
// a write made offline surviving a reload, and a forged change refused in the browser.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';
import { WebSocketServer, WebSocket } from 'ws';
import { Hub, Edge, until } from './procs.mjs';
import { serve } from './serve.mjs';

const CHROMIUM = process.env.SYNCLINE_CHROMIUM ?? '/usr/bin/chromium';
let browser;
let site;

before(async () => {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  site = await serve();
});

after(async () => {
  await browser?.close();
  site?.server.close();
});

/**
 * A hub, an edge-node on it if `edge`, and a fresh browser context (its own storage), all
 * ended after the test.
 */
async function setup(t, { edge = false, hub: hubOpts = {} } = {}) {
  const hub = await Hub.start(hubOpts);
  const e = edge ? await Edge.start(hub) : null;
  const context = await browser.newContext();
  t.after(async () => {
    await context.close();
    if (e) { await e.stop(); e.remove(); }
    await hub.stop();
    hub.remove();
  });
  return { hub, edge: e, context };
}

/** A page of `context` at `path` (the test page by default), its errors logged. */
async function visit(context, path = '/wasm/test/page.html') {
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error('page error:', e.message));
  await page.goto(`${site.url}${path}`);
  return page;
}

/** The test page with a repo open on `hub`. */
async function openPage(context, { name, hub, hubUrl }) {
  const page = await visit(context);
  await page.waitForFunction(() => window.ready === true);
  const peer = await page.evaluate(async ({ name, url, key }) => {
    window.repo = await window.Repo.open({ name, hub: url, hubKey: key });
    window.repo.on('error', (e) => window.events.push(e));
    return window.repo.peerId;
  }, { name, url: hubUrl ?? hub.url, key: hub.key });
  return { page, peer };
}

const change = (page, id, ops) => page.evaluate(async ({ id, ops }) => {
  const doc = await window.repo.find(id);
  return doc.change(ops);
}, { id, ops });
const read = (page, id) => page.evaluate(async (id) => (await window.repo.find(id)).json(), id);
const heads = (page, id) => page.evaluate(async (id) => (await window.repo.find(id)).heads(), id);
const status = (page) => page.evaluate(() => window.repo.status());

test('a write in the browser reaches the edge-node, and the reverse', async (t) => {
  const { hub, edge, context } = await setup(t, { edge: true });
  await edge.subscribe('sensors/');
  const { page, peer } = await openPage(context, { name: 'both-ways', hub });
  hub.grant(peer, 'sensors/');
  await change(page, 'sensors/t1', [{ op: 'put', path: ['celsius'], value: 21.5 }]);
  await until('the edge sees the browser write', 20000, async () => (await edge.json('sensors/t1'))?.celsius === 21.5);
  await edge.change('sensors/t1', [{ op: 'put', path: ['from_edge'], value: 'hello' }]);
  await until('the browser sees the edge write', 20000, async () => (await read(page, 'sensors/t1'))?.from_edge === 'hello');
  const s = await status(page);
  assert.equal(s.online, true);
  assert.equal(s.outbox, 0);
});

test('two browser contexts converge after concurrent edits', async (t) => {
  const { hub, context: c1 } = await setup(t);
  const c2 = await browser.newContext();
  t.after(() => c2.close());
  const a = await openPage(c1, { name: 'ctx', hub });
  const b = await openPage(c2, { name: 'ctx', hub });
  assert.notEqual(a.peer, b.peer, 'each context has its own identity');
  for (const p of [a, b]) hub.grant(p.peer, 'boards/');
  const id = 'boards/stock';
  await change(a.page, id, [{ op: 'put', path: ['bolts'], value: { $counter: 100 } }, { op: 'put', path: ['log'], value: [] }]);
  await until('b gets the board', 20000, async () => (await read(b.page, id))?.bolts === 100);
  const edits = async (p, by, label) => {
    for (let i = 0; i < 10; i++) {
      await change(p.page, id, [{ op: 'increment', path: ['bolts'], by }, { op: 'insert', path: ['log', -1], value: `${label}${i}` }]);
    }
  };
  await Promise.all([edits(a, -1, 'a'), edits(b, -2, 'b')]);
  await until('both converge', 20000, async () => {
    const [ja, jb] = [await read(a.page, id), await read(b.page, id)];
    return ja?.bolts === 70 && jb?.bolts === 70 && JSON.stringify(ja) === JSON.stringify(jb);
  });
  assert.deepEqual(await heads(a.page, id), await heads(b.page, id));
  assert.equal((await read(a.page, id)).log.length, 20);
});

test('a write made offline survives a reload and reaches the edge-node afterwards', async (t) => {
  const { hub, edge, context } = await setup(t, { edge: true, hub: { fixed: true } });
  await edge.subscribe('notes/');
  const { page, peer } = await openPage(context, { name: 'offline', hub });
  hub.grant(peer, 'notes/');
  await until('online', 20000, async () => (await status(page)).online);
  // A clean stop: the edge-node's QUIC session ends at once (after a SIGKILL it would wait
  // for QUIC's idle timeout, 30 s, before reconnecting).
  await hub.stop('SIGTERM');
  await until('the browser notices the hub is gone', 20000, async () => !(await status(page)).online);
  await change(page, 'notes/n1', [{ op: 'put', path: ['text'], value: 'written offline' }]);
  assert.equal((await status(page)).outbox, 1);
  await page.reload();
  await page.waitForFunction(() => window.ready === true);
  await page.evaluate(async ({ url, key }) => {
    window.repo = await window.Repo.open({ name: 'offline', hub: url, hubKey: key });
  }, { url: hub.url, key: hub.key });
  assert.deepEqual(await read(page, 'notes/n1'), { text: 'written offline' }, 'the write survived the reload');
  assert.equal((await status(page)).outbox, 1, 'and still waits for the hub');
  await hub.run();
  await until('the edge gets the offline write', 30000, async () => (await edge.json('notes/n1'))?.text === 'written offline');
  await until('the browser outbox empties', 20000, async () => (await status(page)).outbox === 0);
});

/**
 * A hostile hub in the middle: passes every frame, but flips one bit in the signature of
 * the first change of each `Changes` frame (tag 3: doc id, count, then each change as its
 * bytes and a 64-byte signature, postcard-encoded).
 */
function forgingProxy(upstream) {
  const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  let forged = 0;
  const varint = (b, i) => {
    let v = 0; let shift = 0;
    for (;;) { const x = b[i++]; v += (x & 0x7f) * 2 ** shift; if (x < 0x80) return [v, i]; shift += 7; }
  };
  const forge = (buf) => {
    const b = new Uint8Array(buf);
    let i = 4;
    if (b[i++] !== 3) return b;
    let n; [n, i] = varint(b, i); i += n; // doc id
    let count; [count, i] = varint(b, i);
    if (count === 0) return b;
    [n, i] = varint(b, i); i += n; // the change's bytes
    if (b[i] !== 64) return b; // not where a signature starts: leave it
    b[i + 1 + 10] ^= 0x01;
    forged++;
    return b;
  };
  server.on('connection', (client) => {
    const up = new WebSocket(upstream);
    const queued = [];
    up.on('open', () => { for (const m of queued.splice(0)) up.send(m); });
    client.on('message', (m) => (up.readyState === 1 ? up.send(m) : queued.push(m)));
    up.on('message', (m) => client.send(forge(m)));
    client.on('close', () => up.close());
    up.on('close', () => client.close());
  });
  return new Promise((r) => server.on('listening', () => r({
    url: `ws://127.0.0.1:${server.address().port}/v1/sync`,
    forged: () => forged,
    close: () => server.close(),
  })));
}

test('a forged change from the hub is refused in the browser', async (t) => {
  const { hub, edge, context } = await setup(t, { edge: true });
  const proxy = await forgingProxy(hub.url);
  t.after(() => proxy.close());
  await edge.change('alarms/a1', [{ op: 'put', path: ['armed'], value: false }]);
  const { page, peer } = await openPage(context, { name: 'forged', hub, hubUrl: proxy.url });
  hub.grant(peer, 'alarms/');
  await page.evaluate(() => window.repo.find('alarms/a1'));
  await until('the proxy forges a change', 20000, async () => proxy.forged() > 0);
  // (The first session may be refused before the grant lands: unknown key.)
  const events = await until('the browser reports the forged signature', 20000, async () => {
    const ev = await page.evaluate(() => window.events);
    return ev.some((e) => /signature/i.test(e.message)) && ev;
  });
  assert.ok(events.length > 0);
  assert.equal(await read(page, 'alarms/a1'), null, 'nothing of the forged change was stored');
  assert.deepEqual(await page.evaluate(() => window.repo.docIds()), []);
});

test('the example inventory board syncs with an edge-node', async (t) => {
  const { hub, edge, context } = await setup(t, { edge: true });
  await edge.subscribe('sites/');
  const id = 'sites/berlin/inventory';
  await edge.change(id, [{ op: 'put', path: ['stock'], value: { bolts: { $counter: 10 } } }]);
  const page = await visit(context, `/examples/web-board/?hub=${encodeURIComponent(hub.url)}&key=${hub.key}`);
  const key = await until('the board shows its key', 20000, async () => /^[0-9a-f]{64}$/.test(await page.textContent('#key')) && page.textContent('#key'));
  hub.grant(key, 'sites/');
  await page.waitForSelector('#items tr', { timeout: 20000 });
  assert.match(await page.textContent('#items'), /bolts\s*10/);
  await page.click('#items tr button:has-text("−")');
  await until('the edge sees the board take a bolt', 20000, async () => (await edge.json(id))?.stock?.bolts === 9);
  await page.fill('#name', 'nuts');
  await page.fill('#qty', '5');
  await page.click('#add button');
  await until('the edge sees the new item', 20000, async () => (await edge.json(id))?.stock?.nuts === 5);
  await edge.change(id, [{ op: 'increment', path: ['stock', 'nuts'], by: 3 }]);
  await until('the board shows the edge write', 20000, async () => /nuts\s*8/.test(await page.textContent('#items')));
  assert.match(await page.textContent('#status'), /online/);
});

test('a second tab cannot open a storage name another tab holds, and says why', async (t) => {
  const { hub, context } = await setup(t);
  const first = await openPage(context, { name: 'owned', hub });
  await change(first.page, 'tabs/x', [{ op: 'put', path: ['v'], value: 1 }]);
  const second = await visit(context);
  await second.waitForFunction(() => window.ready === true);
  const refused = await second.evaluate(async () => {
    try {
      await window.Repo.open({ name: 'owned' });
      return null;
    } catch (e) {
      return e.message;
    }
  });
  assert.match(refused ?? 'it opened', /another tab or worker/);
  assert.deepEqual(await read(first.page, 'tabs/x'), { v: 1 }, 'the first tab is unharmed');
  // Once the first tab closes its repo, the second can open it and finds the data.
  await first.page.evaluate(() => window.repo.close());
  const v = await second.evaluate(async () => {
    const r = await window.Repo.open({ name: 'owned' });
    return (await r.find('tabs/x')).json();
  });
  assert.deepEqual(v, { v: 1 });
});
