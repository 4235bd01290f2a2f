/**
 * The metrics listener: plain HTTP (node:http) beside the gRPC server, on
 * METRICS_HOST:METRICS_PORT, answering `GET /metrics` (and HEAD) with the
 * registry in the Prometheus text format. Any other path is 404, any other
 * method on /metrics 405. It has no authentication and no TLS, which is why
 * config.ts keeps it on loopback unless METRICS_ALLOW_REMOTE=true.
 *
 * A scrape only reads: the counters live in memory, and the one gauge read
 * from the database (billing_retries_pending) is a single counting query on a
 * reader connection.
 */
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import type { Registry } from 'prom-client';

export interface MetricsServerDeps {
  host: string;
  /** 0 picks a free port. */
  port: number;
  registry: Registry;
  log: Logger;
}

export interface MetricsServer {
  /** The port it listens on (useful with METRICS_PORT=0). */
  readonly port: number;
  /** Stops listening and closes every connection (scrapers keep theirs alive). */
  close(): Promise<void>;
}

export async function startMetricsServer(deps: MetricsServerDeps): Promise<MetricsServer> {
  const { host, registry, log } = deps;
  const server = http.createServer((req, res) => {
    const path = (req.url ?? '').split('?')[0];
    if (path !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain; charset=utf-8' }).end('not found; metrics are at /metrics\n');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain; charset=utf-8' }).end('method not allowed\n');
      return;
    }
    registry.metrics().then(
      (text) => {
        res.writeHead(200, { 'content-type': registry.contentType }).end(text);
      },
      (err: unknown) => {
        log.error({ err }, 'metrics: collecting failed');
        res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' }).end('collecting metrics failed\n');
      },
    );
  });
  // Scrapes are small; a client that sends its headers slowly gets cut off.
  server.headersTimeout = 10_000;
  server.requestTimeout = 30_000;
  await new Promise<void>((resolve, reject) => {
    const onError = (err: Error) => reject(err);
    server.once('error', onError);
    server.listen(deps.port, host, () => {
      server.off('error', onError);
      resolve();
    });
  });
  server.on('error', (err) => log.error({ err }, 'metrics listener error'));
  const { port } = server.address() as AddressInfo;
  let closing: Promise<void> | undefined;
  return {
    port,
    close: () =>
      (closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      })),
  };
}
