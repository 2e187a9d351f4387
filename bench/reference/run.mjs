#!/usr/bin/env node
// The reference baseline for syncline-bench: drives the Automerge reference sync server
// (server.mjs: automerge-repo + WebSocket adapter + NodeFS storage, run as a child process) with
// automerge-repo Node clients (each its own Repo + WebSocketClientAdapter, all in this process) on
// the workloads syncline-bench runs against Syncline, and prints ONE JSON line with the result on
// stdout. Progress goes to stderr.
//
//   node run.mjs --workload fanout    --clients C --changes M [--rate R]
//   node run.mjs --workload many-docs --docs D --changes-per-doc K
//   node run.mjs --workload catch-up  --changes N [--reader fresh|offline]
//   common: [--timeout SECONDS (300)] [--server-share all|requested] [--client-storage memory|fs]
//
// What each figure includes (clocks are performance.now(), monotonic, in this process):
//   fanout     `seconds` runs from the first write of any client (every client already connected
//              and holding the document) until the last client holds all C*M writes. Latency is
//              per (write, other client): the time from inside the writer's handle.change() to the
//              receiving client's `change` event carrying that put. The writer stores
//              performance.now() in the value; all clients share this process's clock.
//   many-docs  `seconds` runs from the start of the fresh client's connection (new Repo, empty
//              storage) until it holds every document with exactly the writer's heads. The
//              connection is included because, with the server's share-everything policy, the
//              server starts pushing documents as soon as the handshake is done, before any
//              find(); `connect_ms` says how much of it the handshake took.
//   catch-up   the same for one document of N changes. --reader fresh (the default): a new client
//              with empty storage; --reader offline: a client that got the (empty) document into
//              its NodeFS storage before the writer started, then went offline, and is now
//              restarted as a new Repo on that storage (loading it is then part of the time).
// Not included anywhere: process and server start-up, the writer producing its changes and the
// wait until the server has acknowledged all of them (reported as `setup_seconds`).
//
// Exit status: 0 when the workload ran to a verdict: "converged": true, or false with the fraction
// that arrived and "error" when it did not finish within --timeout or automerge-repo threw during
// the measured phase (the reference failing the workload is a result). 1 when the run failed
// before or outside the measurement (the server did not start or died, a client could not
// connect, a document was unavailable, the setup ran out of time, ...): the JSON line then has
// "failed": true, "phase" and "error". 2 for bad arguments.

import { spawn } from "node:child_process"
import fs from "node:fs"
import os from "node:os"
import path from "node:path"
import { fileURLToPath } from "node:url"
import util from "node:util"
import * as A from "@automerge/automerge"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

// stdout carries exactly one JSON line: automerge-repo logs its errors with console.log, so all
// console output goes to stderr (compactly: it logs whole sync messages as byte arrays).
for (const name of ["log", "info", "warn", "debug"]) {
  console[name] = (...args) =>
    process.stderr.write(
      util.formatWithOptions({ depth: 3, maxArrayLength: 0, breakLength: Infinity }, ...args) + "\n",
    )
}

const HERE = path.dirname(fileURLToPath(import.meta.url))
const IMPL = "automerge-repo"
const T0 = performance.now()

// ---------------------------------------------------------------------------------------------
// Arguments

function usage(msg) {
  if (msg) process.stderr.write(`run.mjs: ${msg}\n`)
  process.stderr.write(
    [
      "usage:",
      "  node run.mjs --workload fanout    --clients C --changes M [--rate R]",
      "  node run.mjs --workload many-docs --docs D --changes-per-doc K",
      "  node run.mjs --workload catch-up  --changes N [--reader fresh|offline]",
      "  common: [--timeout SECONDS] [--server-share all|requested] [--client-storage memory|fs]",
      "",
    ].join("\n"),
  )
  process.exit(2)
}

function parseArgs(argv) {
  const o = {
    workload: null,
    clients: null,
    changes: null,
    rate: null,
    docs: null,
    changesPerDoc: null,
    timeout: 300,
    serverShare: "all",
    clientStorage: "memory",
    reader: "fresh",
  }
  const num = (flag, v, { integer = true, min = 1 } = {}) => {
    const n = Number(v)
    if (!Number.isFinite(n) || (integer && !Number.isInteger(n)) || n < min)
      usage(`${flag} wants ${integer ? "an integer" : "a number"} >= ${min}, not ${v}`)
    return n
  }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const value = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`)
      return argv[++i]
    }
    switch (a) {
      case "--workload":
        o.workload = value()
        break
      case "--clients":
        o.clients = num(a, value())
        break
      case "--changes":
        o.changes = num(a, value())
        break
      case "--rate":
        o.rate = num(a, value(), { integer: false, min: Number.MIN_VALUE })
        break
      case "--docs":
        o.docs = num(a, value())
        break
      case "--changes-per-doc":
        o.changesPerDoc = num(a, value())
        break
      case "--timeout":
        o.timeout = num(a, value(), { integer: false, min: Number.MIN_VALUE })
        break
      case "--server-share":
        o.serverShare = value()
        if (!["all", "requested"].includes(o.serverShare))
          usage(`--server-share is all or requested`)
        break
      case "--client-storage":
        o.clientStorage = value()
        if (!["memory", "fs"].includes(o.clientStorage))
          usage(`--client-storage is memory or fs`)
        break
      case "--reader":
        o.reader = value()
        if (!["fresh", "offline"].includes(o.reader)) usage(`--reader is fresh or offline`)
        break
      case "-h":
      case "--help":
        usage()
        break
      default:
        usage(`unknown argument ${a}`)
    }
  }
  switch (o.workload) {
    case "fanout":
      if (o.clients == null || o.changes == null) usage("fanout needs --clients and --changes")
      break
    case "many-docs":
      if (o.docs == null || o.changesPerDoc == null)
        usage("many-docs needs --docs and --changes-per-doc")
      break
    case "catch-up":
      if (o.changes == null) usage("catch-up needs --changes")
      break
    default:
      usage(o.workload ? `unknown workload ${o.workload}` : "--workload is required")
  }
  return o
}

const opts = parseArgs(process.argv.slice(2))
const DEADLINE = T0 + opts.timeout * 1000

// ---------------------------------------------------------------------------------------------
// Output, progress, failure

function versions() {
  const read = rel => {
    try {
      return JSON.parse(fs.readFileSync(path.join(HERE, "node_modules", rel, "package.json")))
        .version
    } catch {
      return null
    }
  }
  return {
    "@automerge/automerge-repo": read("@automerge/automerge-repo"),
    "@automerge/automerge-repo-network-websocket": read(
      "@automerge/automerge-repo-network-websocket",
    ),
    "@automerge/automerge": read("@automerge/automerge"),
    node: process.version,
  }
}

function baseResult() {
  const r = { impl: IMPL, workload: opts.workload }
  if (opts.workload === "fanout") {
    r.clients = opts.clients
    r.changes = opts.clients * opts.changes
    r.changes_per_client = opts.changes
    r.rate = opts.rate
  } else if (opts.workload === "many-docs") {
    r.docs = opts.docs
    r.changes_per_doc = opts.changesPerDoc
    r.changes = opts.docs * opts.changesPerDoc
  } else {
    r.changes = opts.changes
  }
  return r
}

const round = (x, digits = 3) => (x == null ? null : Number(x.toFixed(digits)))
const elapsed = () => ((performance.now() - T0) / 1000).toFixed(1)
function log(msg) {
  process.stderr.write(`[reference +${elapsed()}s] ${msg}\n`)
}

class Timeout extends Error {}

let phase = "start" // for failure reports: where the run was
function enter(p) {
  phase = p
}

let printed = false
function printResult(obj) {
  if (printed) return
  printed = true
  process.stdout.write(JSON.stringify(obj) + "\n")
}

// ---------------------------------------------------------------------------------------------
// Temporary directories and the server child process (always cleaned up)

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), "syncline-reference-"))
let server = null // { child, port, stopping }

function removeTmp() {
  try {
    fs.rmSync(TMP, { recursive: true, force: true })
  } catch {
    // best effort
  }
}

process.on("exit", () => {
  // Last resort (also after process.exit()): never leave the server behind.
  if (server && server.child.exitCode === null && server.child.signalCode === null) {
    try {
      server.child.kill("SIGKILL")
    } catch {
      // already gone
    }
  }
  removeTmp()
})

// While a measured phase runs, an exception thrown inside automerge-repo (often from an event
// handler, so uncaught) ends that phase as "not converged" with the error, instead of failing the
// run: that is the reference failing the workload, which is a result.
let onMeasuredFailure = null
function measuredFailure() {
  let reject
  const promise = new Promise((_, r) => (reject = r))
  promise.catch(() => {})
  onMeasuredFailure = err => {
    onMeasuredFailure = null
    reject(err instanceof Error ? err : new Error(String(err)))
  }
  return { promise, done: () => (onMeasuredFailure = null) }
}

// Once the measurement is over, errors while closing clients are only logged.
let windingDown = false

function uncaught(err) {
  if (onMeasuredFailure) onMeasuredFailure(err)
  else if (windingDown) log(`after the measurement: ${err?.stack ?? err}`)
  else void fail(err)
}

let failing = false
async function fail(err, code = 1) {
  if (failing) return
  failing = true
  const message = err instanceof Error ? err.message : String(err)
  log(`FAILED: ${err instanceof Error && !(err instanceof Timeout) ? err.stack : message}`)
  printResult({ ...baseResult(), failed: true, converged: false, phase, error: message })
  const hard = setTimeout(() => process.exit(code), 8000)
  hard.unref()
  await stopServer()
  process.exit(code)
}

process.on("uncaughtException", uncaught)
process.on("unhandledRejection", uncaught)
process.on("SIGINT", () => void fail(new Error("interrupted (SIGINT)"), 130))
process.on("SIGTERM", () => void fail(new Error("terminated (SIGTERM)"), 143))

function startServer() {
  const dataDir = path.join(TMP, "server-data")
  const child = spawn(
    process.execPath,
    [
      path.join(HERE, "server.mjs"),
      "--port",
      "0",
      "--data",
      dataDir,
      "--share",
      opts.serverShare,
      "--exit-with-stdin",
    ],
    { stdio: ["pipe", "pipe", "pipe"] },
  )
  server = { child, port: null, stopping: false }
  forwardLines(child.stderr, line => process.stderr.write(`[server] ${line}\n`))
  return new Promise((resolve, reject) => {
    const limit = Math.min(DEADLINE, performance.now() + 30_000)
    const timer = setTimeout(
      () => reject(new Error("the reference server did not report ready within 30 s")),
      Math.max(0, limit - performance.now()),
    )
    forwardLines(child.stdout, line => {
      let msg
      try {
        msg = JSON.parse(line)
      } catch {
        process.stderr.write(`[server stdout] ${line}\n`)
        return
      }
      if (msg.ready && server.port == null) {
        server.port = msg.port
        clearTimeout(timer)
        resolve(msg)
      }
    })
    child.on("error", e => {
      clearTimeout(timer)
      reject(new Error(`could not start the reference server: ${e.message}`))
    })
    child.on("exit", (code, signal) => {
      clearTimeout(timer)
      if (server.stopping) return
      const e = new Error(
        `the reference server exited unexpectedly (code ${code}, signal ${signal}); its stderr is above`,
      )
      if (server.port == null) reject(e)
      else void fail(e)
    })
  })
}

async function stopServer() {
  if (!server) return
  const { child } = server
  server.stopping = true
  if (child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise(resolve => child.once("exit", resolve))
  child.stdin.end()
  child.kill("SIGTERM")
  const grace = new Promise(resolve => setTimeout(resolve, 5000).unref())
  await Promise.race([exited, grace])
  if (child.exitCode === null && child.signalCode === null) {
    log("the server did not stop within 5 s of SIGTERM: killing it")
    child.kill("SIGKILL")
    await exited
  }
}

function forwardLines(stream, onLine) {
  let buf = ""
  stream.setEncoding("utf8")
  stream.on("data", chunk => {
    buf += chunk
    let i
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i)
      buf = buf.slice(i + 1)
      if (line.trim()) onLine(line)
    }
  })
  stream.on("end", () => {
    if (buf.trim()) onLine(buf)
  })
}

// ---------------------------------------------------------------------------------------------
// Waiting: on events, bounded by the run's deadline (never a fixed sleep)

/** Resolves when `check()` is true; re-checks whenever one of the given events fires. */
function waitUntil(what, check, { on = [], until = DEADLINE } = {}) {
  return new Promise((resolve, reject) => {
    let timer = null
    const offs = []
    let settled = false
    const settle = err => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      for (const off of offs) off()
      if (err) reject(err)
      else resolve()
    }
    const test = () => {
      try {
        if (check()) settle()
      } catch (e) {
        settle(e)
      }
    }
    for (const [emitter, event] of on) {
      emitter.on(event, test)
      offs.push(() => emitter.off(event, test))
    }
    timer = setTimeout(
      () => settle(new Timeout(`timed out waiting for ${what}`)),
      Math.max(0, until - performance.now()),
    )
    test()
  })
}

/** Throws Timeout once the run's deadline has passed (for loops that produce work). */
function checkDeadline(what) {
  if (performance.now() > DEADLINE) throw new Timeout(`timed out ${what}`)
}

/** A promise that rejects with Timeout at the deadline, for Promise.race. */
function deadlineOf(what, until = DEADLINE) {
  let timer
  const p = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Timeout(`timed out waiting for ${what}`)),
      Math.max(0, until - performance.now()),
    )
  })
  p.catch(() => {})
  return { promise: p, cancel: () => clearTimeout(timer) }
}

/**
 * Runs a measured phase: resolves with { end, failure } where failure is null when `promise`
 * resolved, "timeout" at the deadline, or the error the reference threw (rejections of `promise`
 * and exceptions thrown anywhere while the phase runs).
 */
async function measure(what, promise) {
  const d = deadlineOf(what)
  const m = measuredFailure()
  try {
    const [end] = await Promise.race([promise, d.promise, m.promise])
    return { end, failure: null }
  } catch (e) {
    return { end: performance.now(), failure: e instanceof Timeout ? "timeout" : e }
  } finally {
    d.cancel()
    m.done()
    windingDown = true
  }
}

/** The fields of a result that did not converge. */
function notConverged(failure, fields) {
  return {
    converged: false,
    ...fields,
    error:
      failure === "timeout"
        ? `not converged within --timeout ${opts.timeout} s`
        : `the reference failed: ${failure.message}`,
  }
}

async function withDeadline(what, promise) {
  const d = deadlineOf(what)
  try {
    return await Promise.race([promise, d.promise])
  } finally {
    d.cancel()
  }
}

const headsEqual = (a, b) => {
  if (!a || !b || a.length !== b.length) return false
  const x = [...a].sort()
  const y = [...b].sort()
  return x.every((h, i) => h === y[i])
}

const yieldToLoop = () => new Promise(resolve => setImmediate(resolve))

// ---------------------------------------------------------------------------------------------
// Clients

/**
 * A client: its own Repo with one WebSocketClientAdapter to the server, in this process.
 * Counts WebSocket message payload bytes in both directions (frame headers not included).
 */
async function openClient(name, { storageDir = null } = {}) {
  const traffic = { in: 0, out: 0 }
  const adapter = new WebSocketClientAdapter(`ws://127.0.0.1:${server.port}`)
  const receive = adapter.receiveMessage.bind(adapter)
  adapter.receiveMessage = bytes => {
    traffic.in += bytes.byteLength
    return receive(bytes)
  }
  const connect = adapter.connect.bind(adapter)
  adapter.connect = (...args) => {
    connect(...args)
    const socket = adapter.socket
    if (socket && !socket.__counted) {
      socket.__counted = true
      const send = socket.send.bind(socket)
      socket.send = (data, ...rest) => {
        traffic.out += data.byteLength ?? data.length ?? 0
        return send(data, ...rest)
      }
    }
  }
  const dir = storageDir ?? (opts.clientStorage === "fs" ? path.join(TMP, name) : null)
  const storage = dir ? new NodeFSStorageAdapter(dir) : undefined
  const repo = new Repo({ network: [adapter], storage, peerId: name, sharePolicy: async () => true })
  const client = {
    name,
    repo,
    adapter,
    traffic,
    serverStorageId: null,
    disconnects: 0,
    closing: false,
  }
  repo.networkSubsystem.on("peer-disconnected", () => {
    if (windingDown || client.closing) return // closed on purpose
    if (client.disconnects++ === 0) log(`${name} lost its connection to the server`)
  })
  await waitUntil(`${name} to connect to the server`, () => repo.peers.length > 0, {
    on: [[repo.networkSubsystem, "peer"]],
  })
  const serverPeer = repo.peers[0]
  client.serverStorageId = repo.peerMetadataByPeerId[serverPeer]?.storageId
  if (!client.serverStorageId) throw new Error("the server announced no storage id")
  return client
}

/** Resolves when the server has told `client` that it holds `heads` of `handle`. */
function serverHas(client, handle, heads, what) {
  return waitUntil(
    what,
    () => headsEqual(handle.getSyncInfo(client.serverStorageId)?.lastHeads, heads),
    { on: [[handle, "remote-heads"]] },
  )
}

async function closeClients(clients) {
  await Promise.all(
    clients.map(async c => {
      c.closing = true
      try {
        await c.repo.shutdown()
      } catch (e) {
        log(`closing ${c.name}: ${e?.message ?? e}`)
      }
    }),
  )
}

function progressEvery(ms, fn) {
  const t = setInterval(() => log(fn()), ms)
  t.unref()
  return () => clearInterval(t)
}

function percentiles(samples) {
  if (samples.length === 0) return { p50: null, p95: null, p99: null, max: null, samples: 0 }
  const s = Float64Array.from(samples).sort()
  const at = q => s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]
  return {
    p50: round(at(0.5)),
    p95: round(at(0.95)),
    p99: round(at(0.99)),
    max: round(s[s.length - 1]),
    samples: s.length,
  }
}

// ---------------------------------------------------------------------------------------------
// Workloads

async function fanout() {
  const C = opts.clients
  const M = opts.changes
  const total = C * M
  const setupStart = performance.now()

  enter("setup: connecting clients")
  log(`connecting ${C} clients`)
  const clients = await Promise.all(Array.from({ length: C }, (_, c) => openClient(`client-${c}`)))

  enter("setup: creating and finding the document")
  log("client 0 creates the document")
  const h0 = clients[0].repo.create()
  await serverHas(clients[0], h0, h0.heads(), "the server to hold the new document")
  log(`the other ${C - 1} clients find ${h0.url}`)
  const others = await withDeadline(
    "every client to find the document",
    Promise.all(clients.slice(1).map(c => c.repo.find(h0.url))),
  )
  const handles = [h0, ...others]

  // Every client records every put it sees; for other clients' puts, the latency.
  const seen = handles.map(() => new Set())
  const samples = []
  let convergedClients = 0
  let resolveConverged
  const converged = new Promise(resolve => (resolveConverged = resolve))
  handles.forEach((h, c) => {
    h.on("change", ({ patches }) => {
      const now = performance.now()
      const mine = seen[c]
      const before = mine.size
      for (const p of patches) {
        if (p.action !== "put" || p.path.length !== 1) continue
        const key = p.path[0]
        if (typeof key !== "string" || key[0] !== "w" || mine.has(key)) continue
        mine.add(key)
        const writer = Number(key.slice(1, key.indexOf("_")))
        if (writer !== c && typeof p.value === "number") samples.push(now - p.value)
      }
      if (before < total && mine.size === total && ++convergedClients === C) resolveConverged(now)
    })
  })

  const bytesOutBefore = clients.reduce((s, c) => s + c.traffic.out, 0)
  const setupSeconds = (performance.now() - setupStart) / 1000
  log(
    `${C} clients each write ${M} changes ${opts.rate ? `at ${opts.rate}/s` : "as fast as they can"}`,
  )
  const stopProgress = progressEvery(5000, () => {
    const got = seen.reduce((s, x) => s + x.size, 0)
    return `${convergedClients}/${C} clients converged; ${((100 * got) / (C * total)).toFixed(1)}% of the puts arrived`
  })

  // --- measured from here ---
  enter("measured: writing and converging")
  const start = performance.now()
  const writers = handles.map(async (h, c) => {
    for (let i = 0; i < M; i++) {
      if (opts.rate) {
        // Writers spread over the period, each at `rate` changes/s.
        const at = start + ((i + c / C) / opts.rate) * 1000
        const wait = at - performance.now()
        if (wait > 0) await new Promise(resolve => setTimeout(resolve, wait))
      }
      h.change(d => {
        d[`w${c}_${i}`] = performance.now()
      })
      if (!opts.rate) await yieldToLoop()
    }
  })
  const { end, failure } = await measure(
    "every client to hold every change",
    Promise.all([converged, ...writers]),
  )
  stopProgress()
  // --- measured until here ---
  if (failure && failure !== "timeout") log(`the reference failed: ${failure.stack ?? failure}`)

  const seconds = (end - start) / 1000
  const arrived = seen.reduce((s, x) => s + x.size, 0)
  if (!failure) {
    // Check against the documents themselves (not timed).
    handles.forEach((h, c) => {
      const n = Object.keys(h.doc()).filter(k => k[0] === "w").length
      if (n !== total) throw new Error(`client ${c} saw every put but its document has ${n}/${total}`)
    })
  }
  const bytesOut = clients.reduce((s, c) => s + c.traffic.out, 0) - bytesOutBefore
  const disconnects = clients.reduce((s, c) => s + c.disconnects, 0)
  await closeClients(clients)
  return {
    ...baseResult(),
    seconds: round(seconds, 4),
    changes_per_sec: failure ? null : round(total / seconds, 1),
    latency_ms: percentiles(samples),
    expected_latency_samples: C * (C - 1) * M,
    wire_bytes_per_change: round(bytesOut / total, 1),
    disconnects,
    ...(failure
      ? notConverged(failure, {
          fraction_arrived: round(arrived / (C * total), 4),
          clients_converged: convergedClients,
        })
      : { converged: true }),
    setup_seconds: round(setupSeconds, 3),
    server_share: opts.serverShare,
    client_storage: opts.clientStorage,
    versions: versions(),
  }
}

/**
 * A fresh client (new Repo, empty storage) fetches every url and waits until each document has
 * exactly the expected heads. Timed from before its connection.
 */
async function freshCatchUp(urls, expectedHeads, countChanges, { name = "fresh", storageDir } = {}) {
  enter(`measured: the ${name} client catches up`)
  const start = performance.now()
  // Its connection is part of the measured phase; failing to connect is a failure, not a timeout.
  const fresh = await openClient(name, { storageDir })
  const connectMs = performance.now() - start
  log(`${name} client connected in ${connectMs.toFixed(1)} ms; finding ${urls.length} document(s)`)
  const handles = new Array(urls.length)
  let complete = 0
  let resolveAll
  const all = new Promise(resolve => (resolveAll = resolve))
  const found = urls.map((url, i) =>
    fresh.repo.find(url).then(h => {
      handles[i] = h
      const done = () => headsEqual(h.heads(), expectedHeads[i])
      if (done()) {
        if (++complete === urls.length) resolveAll(performance.now())
        return
      }
      const onHeads = () => {
        if (!done()) return
        h.off("heads-changed", onHeads)
        if (++complete === urls.length) resolveAll(performance.now())
      }
      h.on("heads-changed", onHeads)
    }),
  )
  const stopProgress = progressEvery(5000, () => {
    if (urls.length > 1) return `${name} client holds ${complete}/${urls.length} documents`
    const h = handles[0]
    return `${name} client holds ${h ? countChanges(h) : 0} changes`
  })
  const { end, failure } = await measure(
    "the fresh client to catch up",
    Promise.all([all, ...found]),
  )
  stopProgress()
  if (failure && failure !== "timeout") log(`the reference failed: ${failure.stack ?? failure}`)
  const bytesIn = fresh.traffic.in
  const bytesOut = fresh.traffic.out
  return { fresh, handles, start, end, connectMs, failure, complete, bytesIn, bytesOut }
}

async function manyDocs() {
  const D = opts.docs
  const K = opts.changesPerDoc
  const setupStart = performance.now()
  enter("setup: the writer makes the documents")
  const writer = await openClient("writer")
  log(`writer creates ${D} documents of ${K} changes`)
  const handles = []
  for (let n = 0; n < D; n++) {
    const h = writer.repo.create()
    for (let k = 0; k < K; k++) {
      h.change(d => {
        d[`k${k}`] = k
      })
    }
    handles.push(h)
    if (n % 100 === 99) {
      checkDeadline(`while the writer was still creating documents (${n + 1}/${D})`)
      await yieldToLoop()
    }
  }
  const urls = handles.map(h => h.url)
  const heads = handles.map(h => h.heads())
  enter("setup: waiting for the server to acknowledge the documents")
  let acked = 0
  const stopAckProgress = progressEvery(
    5000,
    () => `the server acknowledged ${acked}/${D} documents`,
  )
  await Promise.all(
    handles.map((h, i) =>
      serverHas(writer, h, heads[i], `the server to acknowledge all ${D} documents`).then(
        () => acked++,
      ),
    ),
  )
  stopAckProgress()
  log("the server holds every document; the writer disconnects")
  await closeClients([writer])
  const setupSeconds = (performance.now() - setupStart) / 1000

  const r = await freshCatchUp(urls, heads, h => A.stats(h.doc()).numChanges)
  const seconds = (r.end - r.start) / 1000
  if (!r.failure) {
    // Every document: the initial change of repo.create() plus K.
    for (const h of r.handles) {
      const n = A.stats(h.doc()).numChanges
      if (n !== K + 1) throw new Error(`${h.url} has ${n} changes, not ${K + 1}`)
    }
  }
  await closeClients([r.fresh])
  return {
    ...baseResult(),
    seconds: round(seconds, 4),
    changes_per_sec: r.failure ? null : round((D * K) / seconds, 1),
    docs_per_sec: r.failure ? null : round(D / seconds, 1),
    connect_ms: round(r.connectMs, 2),
    bytes_in: r.bytesIn,
    bytes_out: r.bytesOut,
    ...(r.failure
      ? notConverged(r.failure, {
          fraction_arrived: round(r.complete / D, 4),
          docs_complete: r.complete,
        })
      : { converged: true }),
    setup_seconds: round(setupSeconds, 3),
    server_share: opts.serverShare,
    client_storage: opts.clientStorage,
    versions: versions(),
  }
}

async function catchUp() {
  const N = opts.changes
  const setupStart = performance.now()
  enter("setup: the writer makes the changes")
  const writer = await openClient("writer")
  const h = writer.repo.create()
  const readerDir = path.join(TMP, "reader")
  if (opts.reader === "offline") {
    // The reader (durable NodeFS storage) gets the new, empty document, then goes offline.
    enter("setup: the reader gets the document and goes offline")
    await serverHas(writer, h, h.heads(), "the server to hold the new document")
    const reader = await openClient("reader", { storageDir: readerDir })
    const rh = await withDeadline("the reader to find the document", reader.repo.find(h.url))
    await waitUntil("the reader to hold the new document", () => headsEqual(rh.heads(), h.heads()), {
      on: [[rh, "heads-changed"]],
    })
    await closeClients([reader])
    log("the reader holds the empty document and is offline")
  }
  enter("setup: the writer makes the changes")
  log(
    `writer makes ${N} changes to one document (the ${opts.reader === "offline" ? "reader is offline" : "fresh client does not exist yet"})`,
  )
  for (let i = 0; i < N; i++) {
    h.change(d => {
      d[`k${i % 100}`] = i
    })
    if (i % 1000 === 999) {
      checkDeadline(`while the writer was still making changes (${i + 1}/${N})`)
      await yieldToLoop()
    }
    if (i % 20000 === 19999) log(`writer: ${i + 1}/${N} changes`)
  }
  const heads = h.heads()
  enter("setup: waiting for the server to acknowledge the changes")
  log("waiting for the server to acknowledge the writer's heads")
  await serverHas(writer, h, heads, `the server to acknowledge all ${N} changes`)
  log("the server holds every change; the writer disconnects")
  await closeClients([writer])
  const setupSeconds = (performance.now() - setupStart) / 1000

  // One more than N: repo.create() makes an initial change.
  const changesOf = handle => A.stats(handle.doc()).numChanges - 1
  const r =
    opts.reader === "offline"
      ? // A new Repo (a restarted process) on the reader's storage: it loads the document it had.
        await freshCatchUp([h.url], [heads], changesOf, { name: "reader", storageDir: readerDir })
      : await freshCatchUp([h.url], [heads], changesOf)
  const seconds = (r.end - r.start) / 1000
  const got = r.handles[0] ? changesOf(r.handles[0]) : 0
  if (!r.failure && got !== N) throw new Error(`the ${opts.reader} client has ${got} changes, not ${N}`)
  await closeClients([r.fresh])
  return {
    ...baseResult(),
    seconds: round(seconds, 4),
    changes_per_sec: r.failure ? null : round(N / seconds, 1),
    connect_ms: round(r.connectMs, 2),
    bytes_in: r.bytesIn,
    bytes_out: r.bytesOut,
    reader: opts.reader,
    ...(r.failure ? notConverged(r.failure, { fraction_arrived: round(got / N, 4) }) : { converged: true }),
    setup_seconds: round(setupSeconds, 3),
    server_share: opts.serverShare,
    client_storage: opts.clientStorage,
    versions: versions(),
  }
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const ready = await startServer()
  log(`reference server ready on 127.0.0.1:${ready.port} (pid ${server.child.pid})`)
  const result =
    opts.workload === "fanout"
      ? await fanout()
      : opts.workload === "many-docs"
        ? await manyDocs()
        : await catchUp()
  printResult(result)
  enter("stopping")
  await stopServer()
  process.exit(0)
}

main().catch(err => fail(err))
