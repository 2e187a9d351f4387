#!/usr/bin/env node
// The Automerge reference sync server for syncline-bench: an automerge-repo `Repo` with the
// WebSocket server adapter and durable NodeFS storage, set up the way automerge-repo's documented
// sync-server example sets it up (a `ws` WebSocketServer on an HTTP server's upgrades, handed to
// WebSocketServerAdapter; a NodeFSStorageAdapter on a data directory), except that it listens on
// loopback only, starts listening only once the adapter handles connections (see below) and,
// by default, shares every document with every peer.
//
//   node server.mjs [--port N] [--host 127.0.0.1] [--data DIR] [--share all|requested]
//
// --port 0 (the default) picks a free port. Without --data the documents go to a new temporary
// directory (left behind: it is durable storage). Once listening, the server prints exactly one
// JSON line on stdout: {"ready":true,"port":N,"host":"127.0.0.1","peerId":"...","data":"..."};
// everything else goes to stderr. It stops on SIGINT/SIGTERM (flushing its documents to disk first) and, with
// --exit-with-stdin, when its stdin closes: run.mjs uses that so that the server never outlives
// the harness, even if the harness is killed with SIGKILL.
//
// --share all (the default): the share policy is `async () => true`, so the server announces and
//   syncs every document it holds with every connected peer.
// --share requested: the documented sync-server's policy (`async () => false`): the server only
//   syncs documents that a peer asks for by id.

import fs from "node:fs"
import http from "node:http"
import os from "node:os"
import path from "node:path"
import util from "node:util"
import { WebSocketServer } from "ws"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

// stdout carries only the ready line: automerge-repo logs its errors with console.log, so all
// console output goes to stderr (compactly: it logs whole sync messages as byte arrays).
for (const name of ["log", "info", "warn", "debug"]) {
  console[name] = (...args) =>
    process.stderr.write(
      util.formatWithOptions({ depth: 3, maxArrayLength: 0, breakLength: Infinity }, ...args) + "\n",
    )
}

function usage(msg) {
  if (msg) process.stderr.write(`server.mjs: ${msg}\n`)
  process.stderr.write(
    "usage: node server.mjs [--port N] [--host ADDR] [--data DIR] [--share all|requested] [--exit-with-stdin]\n",
  )
  process.exit(2)
}

function parseArgs(argv) {
  const opts = {
    port: 0,
    host: "127.0.0.1",
    data: null,
    share: "all",
    exitWithStdin: false,
  }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const value = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`)
      return argv[++i]
    }
    switch (a) {
      case "--port": {
        const v = value()
        opts.port = Number(v)
        if (!Number.isInteger(opts.port) || opts.port < 0 || opts.port > 65535)
          usage(`bad --port ${v}`)
        break
      }
      case "--host":
        opts.host = value()
        break
      case "--data":
        opts.data = value()
        break
      case "--share":
        opts.share = value()
        if (!["all", "requested"].includes(opts.share)) usage(`bad --share ${opts.share}`)
        break
      case "--exit-with-stdin":
        opts.exitWithStdin = true
        break
      case "-h":
      case "--help":
        usage()
        break
      default:
        usage(`unknown argument ${a}`)
    }
  }
  return opts
}

const opts = parseArgs(process.argv.slice(2))
const dataDir =
  opts.data ?? fs.mkdtempSync(path.join(os.tmpdir(), "automerge-reference-server-"))
fs.mkdirSync(dataDir, { recursive: true })

// The WebSocket server is attached to an HTTP server that starts listening only once the adapter
// is listening for connections. WebSocketServerAdapter registers its "connection" handler only
// after the Repo has loaded its storage id (asynchronously), so a `new WebSocketServer({ port })`
// accepts connections before anyone handles them: a client that connects in that window never
// gets its handshake answered, is terminated by the keep-alive, and reconnects 5 s later (we saw
// 10 s stalls in about one run in five).
const wss = new WebSocketServer({ noServer: true })
const httpServer = http.createServer((req, res) => {
  res.writeHead(426, { "content-type": "text/plain" })
  res.end("automerge-repo sync server: connect with a WebSocket\n")
})
httpServer.on("upgrade", (request, socket, head) => {
  wss.handleUpgrade(request, socket, head, ws => wss.emit("connection", ws, request))
})
const adapterListening = new Promise(resolve => {
  const onNew = event => {
    if (event !== "connection") return
    wss.off("newListener", onNew)
    // "newListener" fires just before the listener is added.
    setImmediate(resolve)
  }
  wss.on("newListener", onNew)
})

const sharePolicy = opts.share === "all" ? async () => true : async () => false
const peerId = `reference-server-${os.hostname()}-${process.pid}`
const repo = new Repo({
  network: [new WebSocketServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(dataDir),
  peerId,
  sharePolicy,
})

let stopping = false
async function stop(code) {
  if (stopping) return
  stopping = true
  // A stuck flush must not keep the process alive.
  const hard = setTimeout(() => process.exit(code), 5000)
  hard.unref()
  try {
    await repo.flush()
    await repo.shutdown()
  } catch (e) {
    process.stderr.write(`server.mjs: error while stopping: ${e?.stack ?? e}\n`)
  }
  wss.close()
  httpServer.close()
  process.exit(code)
}

for (const [what, emitter] of [
  ["HTTP", httpServer],
  ["WebSocket", wss],
]) {
  emitter.on("error", e => {
    process.stderr.write(`server.mjs: ${what} server error: ${e?.message ?? e}\n`)
    process.exit(1)
  })
}

process.on("SIGINT", () => stop(0))
process.on("SIGTERM", () => stop(0))
if (opts.exitWithStdin) {
  process.stdin.on("end", () => stop(0))
  process.stdin.on("error", () => stop(0))
  process.stdin.resume()
}

const attachTimeout = setTimeout(() => {
  process.stderr.write("server.mjs: the WebSocket adapter did not start within 30 s\n")
  process.exit(1)
}, 30_000)
await adapterListening
clearTimeout(attachTimeout)

// Say when a connection ends abnormally while the server runs (e.g. the adapter's keep-alive
// terminating a client that did not answer a ping in time: code 1006).
wss.on("connection", socket => {
  socket.on("close", (code, reason) => {
    // 1000, 1001, 1005: closed normally by the client.
    if (!stopping && ![1000, 1001, 1005].includes(code))
      process.stderr.write(
        `server.mjs +${(process.uptime()).toFixed(1)}s: a connection closed (code ${code}${reason?.length ? `, ${reason}` : ""})\n`,
      )
  })
})

httpServer.listen(opts.port, opts.host, () => {
  const addr = httpServer.address()
  process.stdout.write(
    JSON.stringify({ ready: true, port: addr.port, host: opts.host, peerId, data: dataDir }) + "\n",
  )
})
