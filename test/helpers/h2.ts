/**
 * Raw HTTP/2 clients (node:http2) for what a gRPC client library would not
 * send: header values gRPC metadata cannot hold, streams that never end, and
 * floods of them from a separate process.
 */
import { spawn } from 'node:child_process';
import * as http2 from 'node:http2';

/** What a raw call saw: the gRPC status and reason (from headers or trailers) and how the stream ended. */
export interface RawOutcome {
  /** grpc-status, if the server sent one. */
  status?: number;
  /** The billing-error-reason trailer, if any. */
  reason?: string;
  /** The RST_STREAM code the stream closed with (0: NO_ERROR or a clean end). */
  rstCode?: number;
}

/** gRPC length-prefixed framing of one message. */
export function grpcFrame(message: Uint8Array): Buffer {
  const header = Buffer.alloc(5);
  header.writeUInt32BE(message.length, 1);
  return Buffer.concat([header, Buffer.from(message)]);
}

/**
 * One unary call over a fresh HTTP/2 connection, with the given extra request
 * headers sent as they are. Resolves once the stream has closed.
 */
export function rawUnary(address: string, path: string, headers: Record<string, string>, message: Uint8Array): Promise<RawOutcome> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(`http://${address}`);
    session.on('error', reject);
    const outcome: RawOutcome = {};
    const read = (h: http2.IncomingHttpHeaders) => {
      if (h['grpc-status'] !== undefined) outcome.status = Number(h['grpc-status']);
      const reason = h['billing-error-reason'];
      if (reason !== undefined) outcome.reason = String(reason);
    };
    const req = session.request({
      ':method': 'POST',
      ':path': path,
      'content-type': 'application/grpc',
      te: 'trailers',
      ...headers,
    });
    req.on('response', read);
    req.on('trailers', read);
    req.on('error', () => undefined); // the close event reports how it ended
    req.on('close', () => {
      outcome.rstCode = req.rstCode;
      session.close();
      resolve(outcome);
    });
    req.resume();
    req.end(grpcFrame(message));
  });
}

export interface FloodOptions {
  /** host:port */
  address: string;
  connections: number;
  streamsPerConnection: number;
  /** The method path every stream calls. */
  path: string;
  /**
   * Each stream sends a message prefix declaring this many bytes and then all
   * but the last 100 of them, so the message stays unfinished. 0: no data.
   */
  partialMessageBytes?: number;
  /** Extra request headers on every stream. */
  headers?: Record<string, string>;
}

export interface FloodResult {
  /** Streams the client managed to open. */
  opened: number;
  /** Streams the server closed while the client still held them open (it never ends a stream itself). */
  closed: number;
  /** Closed streams by RST_STREAM code. */
  rstCodes: Record<string, number>;
  /** grpc-status values received, with counts. */
  statuses: Record<string, number>;
  /** Connections the server closed. */
  connectionsClosed: number;
}

export interface Flood {
  /**
   * Resolves once every stream is opened, its data written out (or the stream closed) and nothing has
   * happened for a second; or after 60 s.
   */
  settled: Promise<FloodResult>;
  /** Closes every connection and ends the client process. */
  stop(): Promise<void>;
}

/**
 * The flood client. It runs in its own process so that the test process's
 * memory is the server's. It opens its streams without ever ending them (no
 * half-close), prints its counts once things are quiet, and holds everything
 * open until its stdin closes.
 */
const FLOOD_SCRIPT = `
const http2 = require('node:http2');
const o = JSON.parse(process.argv[1]);
const r = { opened: 0, closed: 0, rstCodes: {}, statuses: {}, connectionsClosed: 0 };
let sent = 0; // streams whose data was written out, or that closed first
let last = Date.now();
const touch = () => { last = Date.now(); };
const count = (map, key) => { map[key] = (map[key] || 0) + 1; };
const sessions = [];
const body = (() => {
  if (!o.partialMessageBytes) return null;
  const b = Buffer.alloc(5 + o.partialMessageBytes - 100);
  b.writeUInt32BE(o.partialMessageBytes, 1);
  return b;
})();
(async () => {
  for (let c = 0; c < o.connections; c++) {
    // Room for everything it buffers to send: Node's default (10 MB) would make it reset the answers it gets.
    const s = http2.connect('http://' + o.address, { maxSessionMemory: 4096 });
    sessions.push(s);
    s.on('error', () => {});
    s.on('close', () => { r.connectionsClosed++; touch(); });
    await new Promise((resolve) => { s.once('remoteSettings', resolve); s.once('close', resolve); });
    for (let i = 0; i < o.streamsPerConnection && !s.closed && !s.destroyed; i++) {
      let req;
      try {
        req = s.request({ ':method': 'POST', ':path': o.path, 'content-type': 'application/grpc', te: 'trailers', ...(o.headers || {}) }, { endStream: false });
      } catch { break; }
      r.opened++;
      touch();
      const status = (h) => { if (h['grpc-status'] !== undefined) count(r.statuses, h['grpc-status']); touch(); };
      req.on('response', status);
      req.on('trailers', status);
      req.on('error', () => {});
      let done = false;
      const finish = () => { if (!done) { done = true; sent++; touch(); } };
      req.on('close', () => { r.closed++; count(r.rstCodes, req.rstCode); finish(); });
      req.resume();
      if (body) req.write(body, finish);
      else finish();
      if (i % 100 === 99) await new Promise((resolve) => setImmediate(resolve));
    }
  }
  const started = Date.now();
  const quiet = () => sent === r.opened && Date.now() - last >= 1000;
  while (!quiet() && Date.now() - started < 60000) await new Promise((resolve) => setTimeout(resolve, 100));
  process.stdout.write(JSON.stringify(r) + '\\n');
  process.stdin.on('data', () => {});
  process.stdin.on('end', () => { for (const s of sessions) s.destroy(); process.exit(0); });
})();
`;

export function startFlood(options: FloodOptions): Flood {
  const child = spawn(process.execPath, ['-e', FLOOD_SCRIPT, JSON.stringify(options)], { stdio: ['pipe', 'pipe', 'inherit'] });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const settled = new Promise<FloodResult>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d;
      if (out.includes('\n')) resolve(JSON.parse(out) as FloodResult);
    });
    void exited.then(() => reject(new Error(`flood client exited early: ${out}`)));
  });
  return {
    settled,
    stop: async () => {
      child.stdin!.end();
      await exited;
    },
  };
}
