// The JS API outside a browser (Node, memory storage): the calls, the errors for bad input,
// and sync through a real hub's WebSocket endpoint with an edge-node on the other side.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { Repo } from '../js/index.js';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import WS from 'ws';
import { Hub, Edge, until } from './procs.mjs';

let n = 0;
const open = (opts = {}) => Repo.open({ name: `t${n++}`, storage: 'memory', ...opts });

test('change, read, heads, ids and change events', async () => {
  const repo = await open();
  assert.match(repo.peerId, /^[0-9a-f]{64}$/);
  const doc = await repo.find('sites/berlin/inventory');
  const events = [];
  doc.on('change', (e) => events.push(e));
  const heads = await doc.change([
    { op: 'put', path: ['bolts'], value: { $counter: 10 } },
    { op: 'put', path: ['items'], value: [] },
    { op: 'insert', path: ['items', -1], value: 'bolt' },
  ]);
  await doc.change([{ op: 'increment', path: ['bolts'], by: -3 }]);
  assert.deepEqual(await doc.json(), { bolts: 7, items: ['bolt'] });
  assert.equal(heads.length, 1);
  assert.notDeepEqual(await doc.heads(), heads);
  assert.deepEqual(await repo.docIds(), ['sites/berlin/inventory']);
  assert.equal(events.length, 2);
  assert.equal(events[0].origin, 'local');
  assert.deepEqual(events[1].patches, [{ path: ['bolts'], action: 'increment' }]);
  const s = await repo.status();
  assert.equal(s.outbox, 2, 'both writes wait for a hub');
  assert.equal(s.online, false);
  await repo.close();
  await assert.rejects(repo.status(), /closed/);
});

test('bad input is a thrown Error with a clear message, and the replica is unharmed', async () => {
  const repo = await open();
  const doc = await repo.find('d');
  assert.equal(await doc.json(), null, 'not held yet');
  assert.deepEqual(await doc.heads(), []);
  await doc.change([{ op: 'put', path: ['x'], value: 1 }]);
  const cases = [
    [() => repo.find(42), /document id must be a non-empty string/],
    [() => repo.find(''), /non-empty string/],
    [() => repo.find('a\u0000b'), /bad document id/],
    [() => doc.change('not ops'), /must be an array/],
    [() => doc.change([null]), /operation 0 must be an object/],
    [() => doc.change([{ op: 'put', path: 'x', value: 1 }]), /needs "path"/],
    [() => doc.change([{ op: 'frob', path: ['x'] }]), /bad operations.*frob/],
    [() => doc.change([{ op: 'increment', path: ['x'], by: 1 }]), /refused/],
    [() => doc.change([{ op: 'put', path: ['a', 'b', 'c'], value: 1 }]), /refused/],
    [() => doc.change([{ op: 'put', path: [{}], value: 1 }]), /bad operations/],
    [() => repo.subscribePrefix(7), /prefix must be a string/],
    [() => Repo.open({ name: 'x', storage: 'memory', hub: 'http://nope' }), /ws:\/\/ or wss:\/\//],
    [() => Repo.open({ name: 'x', storage: 'memory', hubKey: 'abc' }), /64 lowercase hex/],
    [() => Repo.open({ name: 'x/../y', storage: 'memory' }), /storage name/],
    [() => Repo.open({ name: 'x', storage: 'disk' }), /"opfs" or "memory"/],
    [() => Repo.open({ name: 'x', storage: 'opfs' }), /OPFS/],
    [() => Repo.open(null), /options object/],
  ];
  for (const [f, want] of cases) {
    let thrown;
    try { await f(); } catch (e) { thrown = e; }
    assert.ok(thrown instanceof Error, `${f}: threw ${thrown}`);
    assert.match(thrown.message, want, `${f}`);
  }
  assert.deepEqual(await doc.json(), { x: 1 }, 'nothing stored was harmed');
  // Writes made together commit together; a bad one among them fails alone.
  const together = await Promise.allSettled([
    doc.change([{ op: 'put', path: ['g1'], value: 1 }]),
    doc.change([{ op: 'increment', path: ['x'], by: 1 }]),
    doc.change([{ op: 'put', path: ['g2'], value: 2 }]),
  ]);
  assert.deepEqual(together.map((r) => r.status), ['fulfilled', 'rejected', 'fulfilled']);
  assert.match(together[1].reason.message, /refused/);
  assert.deepEqual(await doc.json(), { x: 1, g1: 1, g2: 2 });
  await doc.change([{ op: 'delete', path: ['g1'] }, { op: 'delete', path: ['g2'] }]);
  // A read issued after a write, without waiting for it, sees it.
  const write = doc.change([{ op: 'put', path: ['z'], value: 3 }]);
  assert.equal((await doc.json()).z, 3);
  await write;
  await doc.change([{ op: 'delete', path: ['z'] }]);
  await doc.change([{ op: 'put', path: ['y'], value: 2 }]);
  assert.deepEqual(await doc.json(), { x: 1, y: 2 });
  await repo.close();
});

test('two replicas and an edge-node converge through the hub over WebSocket', async (t) => {
  const hub = await Hub.start();
  const edge = await Edge.start(hub);
  t.after(async () => { await edge.stop(); await hub.stop(); edge.remove(); hub.remove(); });
  const a = await open({ hub: hub.url, hubKey: hub.key });
  const b = await open({ hub: hub.url, hubKey: hub.key });
  for (const r of [a, b]) hub.grant(r.peerId, 'boards/');
  const id = 'boards/one';
  await edge.subscribe('boards/');
  const da = await a.find(id);
  const db = await b.find(id);
  await da.change([{ op: 'put', path: ['count'], value: { $counter: 0 } }]);
  await until('b sees the counter', 20000, async () => (await db.json())?.count === 0);
  await until('the edge sees the counter', 20000, async () => (await edge.json(id))?.count === 0);
  // Concurrent increments from both replicas and the edge.
  await Promise.all([
    ...Array.from({ length: 10 }, () => da.change([{ op: 'increment', path: ['count'], by: 1 }])),
    ...Array.from({ length: 10 }, () => db.change([{ op: 'increment', path: ['count'], by: 2 }])),
  ]);
  await edge.change(id, [{ op: 'increment', path: ['count'], by: 100 }]);
  for (const [name, read] of [['a', () => da.json()], ['b', () => db.json()], ['edge', () => edge.json(id)]]) {
    await until(`${name} converges to 130`, 20000, async () => (await read())?.count === 130);
  }
  assert.deepEqual(await da.heads(), await db.heads());
  await until('a has no unacknowledged writes', 10000, async () => (await a.status()).outbox === 0);
  const s = await a.status();
  assert.equal(s.online, true);
  assert.equal(s.hub, hub.key);
  await a.close();
  await b.close();
});

test('a replica pinned to another hub key is refused, and says so', async (t) => {
  const hub = await Hub.start();
  t.after(async () => { await hub.stop(); hub.remove(); });
  const errors = [];
  const r = await open({ hub: hub.url, hubKey: 'ab'.repeat(32) });
  r.on('error', (e) => errors.push(e.message));
  await until('a refusal', 10000, async () => (await r.status()).lastError || errors.length);
  const s = await r.status();
  assert.equal(s.hub, null, 'no session with an unexpected hub');
  await r.close();
});

test('the hub serves wss:// with its certificate', async (t) => {
  const hub = await Hub.start({ tls: true });
  t.after(async () => { await hub.stop(); hub.remove(); });
  assert.match(hub.url, /^wss:\/\//);
  // Trust exactly the hub's self-signed certificate (a browser trusts a CA's instead).
  const der = readFileSync(join(hub.data, 'cert.der'));
  const pem = `-----BEGIN CERTIFICATE-----\n${der.toString('base64').match(/.{1,64}/g).join('\n')}\n-----END CERTIFICATE-----\n`;
  class Pinned extends WS {
    constructor(url) { super(url, { ca: pem, checkServerIdentity: () => undefined }); }
  }
  const a = await open({ hub: hub.url, hubKey: hub.key, WebSocket: Pinned });
  const b = await open({ hub: hub.url, hubKey: hub.key, WebSocket: Pinned });
  for (const r of [a, b]) hub.grant(r.peerId, 'tls/');
  const da = await a.find('tls/doc');
  const db = await b.find('tls/doc');
  await da.change([{ op: 'put', path: ['over'], value: 'tls' }]);
  await until('b gets the write over wss', 20000, async () => (await db.json())?.over === 'tls');
  // A client that does not trust the certificate gets no session.
  const errors = [];
  const c = await open({ hub: hub.url, hubKey: hub.key, WebSocket: WS });
  c.on('error', (e) => errors.push(e));
  await until('the untrusting client stays offline with an error', 10000, async () => (await c.status()).lastError);
  assert.equal((await c.status()).online, false);
  for (const r of [a, b, c]) await r.close();
});

test('the hub refuses bad WebSocket input, and keeps serving', async (t) => {
  const hub = await Hub.start();
  t.after(async () => { await hub.stop(); hub.remove(); });
  const session = (send) => new Promise((resolve) => {
    const ws = new WS(hub.url);
    const got = [];
    ws.on('open', () => send(ws));
    ws.on('message', (m) => got.push(Buffer.from(m)));
    ws.on('close', () => resolve(got));
    ws.on('error', () => {});
  });
  const isError = (frame) => frame.length > 5 && frame[4] === 10; // Message::Error is tag 10
  // A text message, garbage, a frame whose length disagrees with its bytes, two frames in one
  // message: each gets the protocol's Error and the session ends.
  for (const [what, bad] of [
    ['text', 'hello'],
    ['garbage', Buffer.from([0, 0, 0, 3, 0xff, 0xff, 0xff])],
    ['short', Buffer.from([0, 0, 0, 9, 1])],
    ['oversized length', Buffer.from([0xff, 0xff, 0xff, 0xff, 0])],
  ]) {
    const got = await session((ws) => ws.send(bad));
    assert.ok(got.some(isError), `${what}: an Error frame before the close (${got.length} frames)`);
  }
  // A message over the frame limit is refused by the WebSocket layer itself.
  await session((ws) => ws.send(Buffer.alloc(8 * 1024 * 1024 + 16)));
  // The hub still serves a well-behaved replica.
  const a = await open({ hub: hub.url, hubKey: hub.key });
  hub.grant(a.peerId, '');
  await until('a session after the bad ones', 10000, async () => (await a.status()).connected);
  await a.close();
});
