// The package's dedicated worker: OPFS's synchronous file handles, which make the SQLite
// store durable, exist only in workers. The page's Repo talks to it with postMessage.
import { Host } from './host.js';
import { loadEngine } from './load.js';

let host = null;

self.onmessage = async ({ data }) => {
  const { id } = data;
  try {
    if (data.open) {
      if (host) throw new Error('this worker has a repo open already');
      const Engine = await loadEngine();
      const engine = await Host.open(Engine, data.open);
      host = new Host(engine, { ...data.open, onEvent: (event) => self.postMessage({ event }) });
      self.postMessage({ id, result: engine.peerId() });
      return;
    }
    if (!host) throw new Error('the repo is not open');
    const result = await host.call(data.method, data.args ?? []);
    self.postMessage({ id, result });
    if (data.method === 'close') self.close();
  } catch (e) {
    self.postMessage({ id, error: String(e?.message ?? e) });
  }
};
