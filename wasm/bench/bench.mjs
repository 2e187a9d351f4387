// Browser numbers of issue 5, in one run on this machine (docs/BENCHMARKS.md, "Browser"):
//   node --experimental-websocket wasm/bench/bench.mjs [--quick]
// after wasm/build.sh and `cargo build --release -p syncline-hub -p syncline-edge`
// (SYNCLINE_HUB_BIN / SYNCLINE_EDGE_BIN point elsewhere). Prints a table and writes JSON to
// docs/bench/browser.json. Baselines run side by side: the same engine in Node (memory
// storage, no worker) for throughput, an edge-node to edge-node hop for latency.
import { chromium } from 'playwright-core';
import { readFileSync, writeFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Hub, Edge, until } from '../test/procs.mjs';
import { serve } from '../test/serve.mjs';
import { Repo } from '../js/index.js';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..');
const quick = process.argv.includes('--quick');
const DOCS = quick ? 100 : 1000;
const WRITES = quick ? 200 : 2000;
const SAMPLES = quick ? 10 : 50;
const log = (...a) => console.error('[bench]', ...a);
const pct = (xs, p) => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor(p * s.length))]; };

const wasm = readFileSync(join(here, '..', 'pkg', 'syncline_wasm_bg.wasm'));
const results = { machine: `${process.platform} ${process.arch}, node ${process.version}`, quick, size: { raw: wasm.length, gzip: gzipSync(wasm, { level: 9 }).length } };
log(`wasm ${results.size.raw} bytes, ${results.size.gzip} gzipped`);

const browser = await chromium.launch({
  executablePath: process.env.SYNCLINE_CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const site = await serve();
const hub = await Hub.start();
const edge = await Edge.start(hub);
await edge.subscribe('bench/');
const context = await browser.newContext();

async function page(name) {
  const p = await context.newPage();
  await p.goto(`${site.url}/wasm/test/page.html`);
  await p.waitForFunction(() => window.ready === true);
  const peer = await p.evaluate(async ({ name, url, key }) => {
    window.repo = await window.Repo.open({ name, hub: url, hubKey: key });
    return window.repo.peerId;
  }, { name, url: hub.url, key: hub.key });
  hub.grant(peer, 'bench/');
  return p;
}

// 1. Time to open a replica holding DOCS documents, against an empty one (same page, same run).
{
  const p = await page('open-n');
  log(`writing ${DOCS} documents`);
  await p.evaluate(async (n) => {
    for (let i = 0; i < n; i++) {
      const d = await window.repo.find(`bench/open/${i}`);
      await d.change([{ op: 'put', path: ['v'], value: i }]);
    }
    await window.repo.close();
  }, DOCS);
  const openOnce = (name) => p.evaluate(async (name) => {
    const t0 = performance.now();
    const r = await window.Repo.open({ name });
    const ids = await r.docIds();
    const first = await (await r.find(ids[0] ?? 'bench/none')).json();
    const ms = performance.now() - t0;
    await r.close();
    return { ms, docs: ids.length, first: first !== undefined };
  }, name);
  const full = []; const empty = [];
  for (let i = 0; i < 5; i++) { full.push((await openOnce('open-n')).ms); empty.push((await openOnce('open-empty')).ms); }
  results.open = { docs: DOCS, ms_p50: pct(full, 0.5), empty_ms_p50: pct(empty, 0.5) };
  log(`open with ${DOCS} docs: ${results.open.ms_p50.toFixed(1)} ms (empty: ${results.open.empty_ms_p50.toFixed(1)} ms)`);
  await p.close();
}

// 2. Changes/s from one tab, acknowledged (durable) by the hub; the same engine in Node alongside.
{
  const p = await page('tput');
  const browserRun = await p.evaluate(async (n) => {
    const d = await window.repo.find('bench/tput/browser');
    const t0 = performance.now();
    const pending = [];
    for (let i = 0; i < n; i++) pending.push(d.change([{ op: 'put', path: ['v'], value: i }]));
    await Promise.all(pending);
    const local = performance.now() - t0;
    while ((await window.repo.status()).outbox > 0) await new Promise((r) => setTimeout(r, 5));
    return { local, acked: performance.now() - t0 };
  }, WRITES);
  const node = await Repo.open({ name: 'tput-node', storage: 'memory', hub: hub.url, hubKey: hub.key });
  hub.grant(node.peerId, 'bench/');
  await until('node replica online', 10000, async () => (await node.status()).connected);
  const d = await node.find('bench/tput/node');
  const t0 = performance.now();
  await Promise.all(Array.from({ length: WRITES }, (_, i) => d.change([{ op: 'put', path: ['v'], value: i }])));
  const nodeLocal = performance.now() - t0;
  await until('node outbox empty', 60000, async () => (await node.status()).outbox === 0);
  const nodeAcked = performance.now() - t0;
  await node.close();
  results.throughput = {
    writes: WRITES,
    browser_local_per_s: WRITES / (browserRun.local / 1000),
    browser_acked_per_s: WRITES / (browserRun.acked / 1000),
    node_memory_local_per_s: WRITES / (nodeLocal / 1000),
    node_memory_acked_per_s: WRITES / (nodeAcked / 1000),
  };
  const t = results.throughput;
  log(`throughput: browser ${t.browser_acked_per_s.toFixed(0)}/s acked (${t.browser_local_per_s.toFixed(0)}/s stored locally); node memory ${t.node_memory_acked_per_s.toFixed(0)}/s acked`);
  await p.close();
}

// 3. Write-to-visible latency at 5 writes/s: browser -> edge-node (SSE at the edge), edge ->
//    browser, and edge -> edge as the baseline.
{
  const p = await page('lat');
  const edge2 = await Edge.start(hub);
  await edge2.subscribe('bench/');
  const doc = 'bench/lat';
  await p.evaluate(async (id) => { window.latDoc = await window.repo.find(id); window.seen = new Map();
    window.latDoc.on('change', async (e) => { if (e.origin === 'remote') { const j = await window.latDoc.json(); window.seen.set(j.edge_seq, performance.now() + performance.timeOrigin); } }); }, doc);
  await edge.change(doc, [{ op: 'put', path: ['init'], value: true }]);
  await until('the browser holds the doc', 10000, async () => (await p.evaluate(async () => window.latDoc.json())) !== null);
  const watch = async (e) => {
    const res = await fetch(`${e.api}/v1/docs/${encodeURIComponent(doc)}/events`);
    const reader = res.body.getReader();
    const waiters = [];
    (async () => { for (;;) { const { value, done } = await reader.read(); if (done) return; const now = performance.now(); for (const w of waiters.splice(0)) w(now); } })();
    return { next: () => new Promise((r) => waiters.push(r)), cancel: () => reader.cancel() };
  };
  const w1 = await watch(edge);
  const w2 = await watch(edge2);
  const toEdge = []; const toBrowser = []; const edgeToEdge = [];
  for (let i = 0; i < SAMPLES; i++) {
    const seen = w1.next();
    const t0 = performance.now();
    await p.evaluate((i) => window.latDoc.change([{ op: 'put', path: ['b'], value: i }]), i);
    toEdge.push((await seen) - t0);
    await new Promise((r) => setTimeout(r, 100));
    const t1 = performance.now() + performance.timeOrigin;
    const seen2 = w2.next();
    const t2 = performance.now();
    await edge.change(doc, [{ op: 'put', path: ['edge_seq'], value: i }]);
    edgeToEdge.push((await seen2) - t2);
    const atBrowser = await until('the browser sees the edge write', 10000, () => p.evaluate((i) => window.seen.get(i), i));
    toBrowser.push(atBrowser - t1);
    await new Promise((r) => setTimeout(r, 100));
  }
  w1.cancel(); w2.cancel();
  const sum = (xs) => ({ p50: pct(xs, 0.5), p99: pct(xs, 0.99) });
  results.latency_ms = { samples: SAMPLES, browser_to_edge: sum(toEdge), edge_to_browser: sum(toBrowser), edge_to_edge: sum(edgeToEdge) };
  log(`latency ms: browser->edge p50 ${results.latency_ms.browser_to_edge.p50.toFixed(1)}, edge->browser p50 ${results.latency_ms.edge_to_browser.p50.toFixed(1)}, edge->edge p50 ${results.latency_ms.edge_to_edge.p50.toFixed(1)}`);
  await edge2.stop(); edge2.remove();
  await p.close();
}

await context.close();
await browser.close();
site.server.close();
await edge.stop(); await hub.stop(); edge.remove(); hub.remove();
const out = join(root, 'docs', 'bench', quick ? 'browser-quick.json' : 'browser.json');
writeFileSync(out, `${JSON.stringify(results, null, 2)}\n`);
console.log(JSON.stringify(results, null, 2));
log(`wrote ${out}`);
