/**
 * Process entry point: config -> app -> signals. SIGTERM/SIGINT: health goes
 * NOT_SERVING, new calls are refused, in-flight calls finish (bounded by
 * SHUTDOWN_GRACE_MS, then forced), jobs stop, the database closes, exit 0.
 * A second signal exits 1 at once, except the same signal again within
 * ECHO_WINDOW_MS: under `npm start` in a terminal, Ctrl-C reaches this process
 * twice, from the terminal (it signals the whole foreground process group)
 * and forwarded by npm, and that is one request to stop, not two.
 */
import { startApp } from './app';
import { ConfigError, loadConfig } from './config';
import { createLogger } from './shared/logger';

/** How soon the same signal again counts as an echo of the first (npm forwarding what the terminal sent). */
const ECHO_WINDOW_MS = 1000;

async function main(): Promise<void> {
  let config;
  try {
    config = loadConfig();
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`billing-service: invalid configuration: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
  const log = createLogger(config.logLevel);
  process.on('unhandledRejection', (err) => log.error({ err }, 'unhandled promise rejection'));
  // Settings that need files (tokens, TLS) or a combination check are validated as the app starts.
  const app = await startApp(config, { log }).catch((err: unknown) => {
    if (err instanceof ConfigError) {
      process.stderr.write(`billing-service: invalid configuration: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  });
  let first: { signal: NodeJS.Signals; at: number } | undefined;
  const onSignal = (signal: NodeJS.Signals) => {
    const at = performance.now();
    if (first !== undefined) {
      if (signal === first.signal && at - first.at < ECHO_WINDOW_MS) return;
      log.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
    first = { signal, at };
    log.info({ signal }, 'shutting down');
    app.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
}

main().catch((err: unknown) => {
  process.stderr.write(`billing-service: failed to start: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(1);
});
