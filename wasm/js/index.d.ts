// Types of the syncline-wasm package (js/index.js).

/** One operation of the shared operation set (docs/API.md, "Operations"). */
export type Op =
  | { op: 'put'; path: Path; value: unknown }
  | { op: 'delete'; path: Path }
  | { op: 'increment'; path: Path; by: number }
  | { op: 'insert'; path: Path; value: unknown }
  | { op: 'splice'; path: Path; index: number; delete: number; text?: string };

/** Map keys and list indexes from the document's root; -1 is a list's end where allowed. */
export type Path = Array<string | number>;

export interface OpenOptions {
  /** Names the replica's storage in this origin: 1 to 64 letters, digits, '-' or '_'. */
  name: string;
  /** The hub's WebSocket endpoint, ws:// or wss://…/v1/sync. Absent: local only. */
  hub?: string | null;
  /** The hub's public key (64 hex characters), pinned in the handshake. */
  hubKey?: string | null;
  /** "opfs" (durable, the default in browsers) or "memory" (the default in Node). */
  storage?: 'opfs' | 'memory';
  /** A WebSocket class, where there is no global one (memory storage only). */
  WebSocket?: unknown;
}

export interface Status {
  /** The WebSocket is open. */
  online: boolean;
  /** A session is authenticated. */
  connected: boolean;
  /** The hub's key, when a session is authenticated. */
  hub: string | null;
  /** Local writes the hub has not acknowledged yet. */
  outbox: number;
  /** Of those, how many the hub refused (they stay here). */
  rejected: number;
  /** Subscriptions caught up in this session. */
  synced: string[];
  subscriptions: string[];
  /** The last connection or protocol error, cleared when a session comes up. */
  lastError: string | null;
}

export interface ChangeEvent {
  type: 'change';
  doc: string;
  origin: 'local' | 'remote';
  heads: string[];
  patches: Array<{ path: Path; action: string }>;
}

export interface RepoEvents {
  change: ChangeEvent;
  status: Status;
  error: { type: 'error'; message: string };
  rejected: { type: 'rejected'; doc: string; code: string; message: string };
  synced: { type: 'synced'; target: string };
  acknowledged: { type: 'acknowledged'; doc: string; changes: number };
  connected: { type: 'connected'; hub: string };
}

export class Repo {
  /** Opens (or creates) the replica `name`; its identity is made on first open and kept. */
  static open(options: OpenOptions): Promise<Repo>;
  /** This replica's public key (hex): what the hub operator grants. */
  readonly peerId: string;
  /** The document `id`, subscribed to. */
  find(id: string): Promise<DocHandle>;
  /** Subscribes to every document whose id starts with `prefix`. */
  subscribePrefix(prefix: string): Promise<void>;
  docIds(): Promise<string[]>;
  status(): Promise<Status>;
  /** Returns a function that removes the listener. */
  on<K extends keyof RepoEvents>(type: K, cb: (event: RepoEvents[K]) => void): () => void;
  /** Ends the session and releases the storage. */
  close(): Promise<void>;
}

export class DocHandle {
  readonly id: string;
  /** Resolves with the new heads once the change is stored durably. */
  change(ops: Op[]): Promise<string[]>;
  /** The document as a plain object; null while this replica does not hold it. */
  json(): Promise<Record<string, unknown> | null>;
  heads(): Promise<string[]>;
  on(type: 'change', cb: (event: ChangeEvent) => void): () => void;
}
