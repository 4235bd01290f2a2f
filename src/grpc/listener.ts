/**
 * The listening sockets, owned here rather than by grpc-js, so that the
 * number of connections can be capped: grpc-js 1.14 has no option for it and
 * keeps the net/http2 server that `bindAsync` creates to itself. Its public
 * `Server.createConnectionInjector(credentials)` returns an HTTP/2 server
 * (with TLS when the credentials say so) that is fed connections from outside:
 * this module listens, counts connections and injects the ones within the cap.
 * A connection over the cap is closed at once, before any TLS or HTTP/2 work.
 *
 * Like `bindAsync`, a host name is resolved and every address it resolves to
 * is listened on, all with the same port.
 */
import { promises as dns } from 'node:dns';
import * as net from 'node:net';
import type * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';

export interface Listener {
  /** The bound port (the one picked when 0 was asked for). */
  readonly port: number;
  /** Connections currently open. */
  connections(): number;
  /** Stops accepting connections; open ones are left to the gRPC server's shutdown. */
  close(): void;
  /** Resolves once no connection is open (at once when none is). */
  allClosed(): Promise<void>;
  /** Destroys every connection still open (after the shutdown grace). */
  destroyAll(): void;
}

export interface ListenOptions {
  host: string;
  port: number;
  maxConnections: number;
  injector: grpc.ConnectionInjector;
  log: Logger;
}

/** How often at most a "connection refused: limit reached" warning is logged. */
const DROP_WARNING_INTERVAL_MS = 10_000;

async function addressesOf(host: string): Promise<string[]> {
  const bare = host.replace(/^\[(.*)\]$/, '$1');
  if (net.isIP(bare)) return [bare];
  const found = await dns.lookup(bare, { all: true });
  return [...new Set(found.map((a) => a.address))];
}

function listenOn(server: net.Server, address: string, port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error) => reject(err);
    server.once('error', onError);
    server.listen({ host: address, port }, () => {
      server.off('error', onError);
      resolve((server.address() as net.AddressInfo).port);
    });
  });
}

export async function listen(options: ListenOptions): Promise<Listener> {
  const { maxConnections, injector, log } = options;
  const open = new Set<net.Socket>();
  let whenAllClosed: (() => void)[] = [];
  const closed = (socket: net.Socket) => {
    open.delete(socket);
    if (open.size > 0) return;
    const waiting = whenAllClosed;
    whenAllClosed = [];
    for (const resolve of waiting) resolve();
  };
  let dropped = 0;
  let lastWarning = 0;

  const onConnection = (socket: net.Socket) => {
    if (open.size >= maxConnections) {
      socket.destroy();
      dropped++;
      const now = Date.now();
      if (now - lastWarning >= DROP_WARNING_INTERVAL_MS) {
        log.warn({ maxConnections, dropped }, 'connection refused: MAX_CONNECTIONS reached');
        lastWarning = now;
        dropped = 0;
      }
      return;
    }
    open.add(socket);
    socket.once('close', () => closed(socket));
    // HTTP/2 and TLS handle the socket's errors; this only keeps a reset before they attach from being unhandled.
    socket.on('error', () => undefined);
    injector.injectConnection(socket);
  };

  const servers: net.Server[] = [];
  const failed: { address: string; err: unknown }[] = [];
  let port = options.port;
  for (const address of await addressesOf(options.host)) {
    const server = net.createServer(onConnection);
    try {
      port = await listenOn(server, address, port);
      server.on('error', (err) => log.warn({ err, address }, 'listener error'));
      servers.push(server);
    } catch (err) {
      failed.push({ address, err });
    }
  }
  if (servers.length === 0) throw failed[0]?.err ?? new Error(`no address to listen on for ${options.host}`);
  for (const { address, err } of failed) log.warn({ err, address, port }, 'could not listen on one of the addresses the host resolves to');

  return {
    port,
    connections: () => open.size,
    close() {
      for (const server of servers) server.close();
    },
    allClosed() {
      return open.size === 0 ? Promise.resolve() : new Promise<void>((resolve) => whenAllClosed.push(resolve));
    },
    destroyAll() {
      for (const socket of open) socket.destroy();
    },
  };
}
