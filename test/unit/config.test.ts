import { checkExposure, ConfigError, DEFAULT_GRPC_LIMITS, isLoopbackHost, loadConfig } from '../../src/config';

type Env = Record<string, string | undefined>;

/** The error `loadConfig(env)` throws; fails the test if it returns. */
function configErrorFor(env: Env): ConfigError {
  let thrown: unknown;
  try {
    loadConfig(env);
  } catch (e) {
    thrown = e;
  }
  if (thrown === undefined) throw new Error(`expected loadConfig(${JSON.stringify(env)}) to throw`);
  expect(thrown).toBeInstanceOf(ConfigError);
  return thrown as ConfigError;
}

describe('loadConfig defaults', () => {
  const config = loadConfig({});

  it('listens on 127.0.0.1:50051', () => {
    expect(config.grpcHost).toBe('127.0.0.1');
    expect(config.grpcPort).toBe(50051);
  });

  it('uses SQLite at ./billing.db', () => {
    expect(config.database).toEqual({ kind: 'sqlite', path: './billing.db' });
  });

  it('bills in USD at log level info', () => {
    expect(config.currency).toBe('USD');
    expect(config.logLevel).toBe('info');
  });

  it('keeps the access log off', () => {
    expect(config.accessLog).toBe(false);
  });

  it('prices the four default services in micros', () => {
    expect(config.pricing).toEqual(
      new Map([
        ['api-calls', 10_000n],
        ['storage', 50_000n],
        ['bandwidth', 20_000n],
        ['compute', 100_000n],
      ]),
    );
    expect(config.pricing.get('api-calls')).toBe(10_000n);
    expect(config.pricing.get('compute')).toBe(100_000n);
  });

  it('retries from a 1000 ms base up to 5 times', () => {
    expect(config.retryBaseDelayMs).toBe(1000);
    expect(config.maxRetries).toBe(5);
  });

  it('ingests hourly from ./data/usage-logs.json', () => {
    expect(config.ingestCron).toBe('0 * * * *');
    expect(config.logFilePath).toBe('./data/usage-logs.json');
  });

  it('treats empty strings as unset for numbers and paths', () => {
    const c = loadConfig({ GRPC_PORT: '', LOG_FILE_PATH: '', DB_PATH: '', MAX_RETRIES: '' });
    expect(c.grpcPort).toBe(50051);
    expect(c.logFilePath).toBe('./data/usage-logs.json');
    expect(c.database).toEqual({ kind: 'sqlite', path: './billing.db' });
    expect(c.maxRetries).toBe(5);
    expect(c.usageReadTimeoutMs).toBe(30_000);
  });
});

describe('loadConfig overrides', () => {
  it('reads host, port, paths, retries and log level', () => {
    const c = loadConfig({
      GRPC_HOST: '0.0.0.0',
      GRPC_PORT: '6000',
      DB_PATH: '/var/lib/billing.db',
      LOG_FILE_PATH: '/logs/usage.ndjson',
      RETRY_BASE_DELAY_MS: '250',
      MAX_RETRIES: '0',
      LOG_LEVEL: 'debug',
    });
    expect(c.grpcHost).toBe('0.0.0.0');
    expect(c.grpcPort).toBe(6000);
    expect(c.database).toEqual({ kind: 'sqlite', path: '/var/lib/billing.db' });
    expect(c.logFilePath).toBe('/logs/usage.ndjson');
    expect(c.retryBaseDelayMs).toBe(250);
    expect(c.maxRetries).toBe(0);
    expect(c.logLevel).toBe('debug');
  });

  it('accepts port 0 and 65535 and MAX_RETRIES 30', () => {
    expect(loadConfig({ GRPC_PORT: '0' }).grpcPort).toBe(0);
    expect(loadConfig({ GRPC_PORT: '65535' }).grpcPort).toBe(65535);
    expect(loadConfig({ MAX_RETRIES: '30' }).maxRetries).toBe(30);
  });

  it('reads USAGE_READ_TIMEOUT_MS', () => {
    expect(loadConfig({ USAGE_READ_TIMEOUT_MS: '2500' }).usageReadTimeoutMs).toBe(2500);
  });

  it('upper-cases the currency code', () => {
    expect(loadConfig({ CURRENCY: 'eur' }).currency).toBe('EUR');
  });

  it.each<[string, boolean]>([
    ['true', true],
    ['TRUE', true],
    [' false ', false],
    ['', false],
  ])('reads ACCESS_LOG=%j as %s', (value, expected) => {
    expect(loadConfig({ ACCESS_LOG: value }).accessLog).toBe(expected);
  });

  it('disables the ingest schedule with INGEST_CRON=off', () => {
    expect(loadConfig({ INGEST_CRON: 'off' }).ingestCron).toBeNull();
  });

  it('keeps a custom valid INGEST_CRON', () => {
    expect(loadConfig({ INGEST_CRON: '*/5 * * * *' }).ingestCron).toBe('*/5 * * * *');
  });

  it.each(['postgres://user:pw@db:5432/billing', 'postgresql://user:pw@db:5432/billing'])(
    'selects PostgreSQL for DATABASE_URL %s',
    (url) => {
      expect(loadConfig({ DATABASE_URL: url, DB_PATH: '/ignored.db' }).database).toEqual({ kind: 'postgresql', url });
    },
  );

  it('replaces the default price list with a custom PRICING', () => {
    const c = loadConfig({ PRICING: '{"gpu-hours":"1.25","api-calls":"0.001","free":"0"}' });
    expect(c.pricing).toEqual(
      new Map([
        ['gpu-hours', 1_250_000n],
        ['api-calls', 1_000n],
        ['free', 0n],
      ]),
    );
    expect(c.pricing.has('storage')).toBe(false);
  });

  it('has no low-balance threshold by default (LOW_BALANCE_THRESHOLD 0: no balance.low events)', () => {
    expect(loadConfig({}).lowBalanceThreshold).toBe(0n);
    expect(loadConfig({ LOW_BALANCE_THRESHOLD: '' }).lowBalanceThreshold).toBe(0n);
  });

  it.each<[string, bigint]>([
    ['10.00', 10_000_000n],
    [' 2.5 ', 2_500_000n],
    ['0.000001', 1n],
    ['0', 0n],
  ])('reads LOW_BALANCE_THRESHOLD %j as %s micros', (raw, micros) => {
    expect(loadConfig({ LOW_BALANCE_THRESHOLD: raw }).lowBalanceThreshold).toBe(micros);
  });
});

describe('loadConfig rejects invalid values with a ConfigError naming the variable', () => {
  it.each<[string, Env]>([
    ['GRPC_PORT', { GRPC_PORT: 'abc' }],
    ['GRPC_PORT', { GRPC_PORT: '70000' }],
    ['GRPC_PORT', { GRPC_PORT: '-1' }],
    ['GRPC_PORT', { GRPC_PORT: '80.5' }],
    ['CURRENCY', { CURRENCY: 'US' }],
    ['CURRENCY', { CURRENCY: 'US1' }],
    ['LOG_LEVEL', { LOG_LEVEL: 'loud' }],
    ['ACCESS_LOG', { ACCESS_LOG: 'yes' }],
    ['ACCESS_LOG', { ACCESS_LOG: '1' }],
    ['PRICING', { PRICING: 'not json' }],
    ['PRICING', { PRICING: '["0.01"]' }],
    ['PRICING', { PRICING: '"0.01"' }],
    ['PRICING', { PRICING: '{"api-calls":0.01}' }],
    ['PRICING', { PRICING: '{"api-calls":"-0.01"}' }],
    ['PRICING', { PRICING: '{"api-calls":"0.0000001"}' }],
    ['PRICING', { PRICING: '{"api-calls":"cheap"}' }],
    ['PRICING', { PRICING: '{" api-calls":"0.01"}' }],
    ['LOW_BALANCE_THRESHOLD', { LOW_BALANCE_THRESHOLD: '-1' }],
    ['LOW_BALANCE_THRESHOLD', { LOW_BALANCE_THRESHOLD: '0.0000001' }],
    ['LOW_BALANCE_THRESHOLD', { LOW_BALANCE_THRESHOLD: 'ten' }],
    ['LOW_BALANCE_THRESHOLD', { LOW_BALANCE_THRESHOLD: '99999999999999' }],
    ['INGEST_CRON', { INGEST_CRON: 'not a cron' }],
    ['INGEST_CRON', { INGEST_CRON: '61 * * * *' }],
    ['DATABASE_URL', { DATABASE_URL: 'mysql://x' }],
    ['RETRY_BASE_DELAY_MS', { RETRY_BASE_DELAY_MS: '0' }],
    ['MAX_RETRIES', { MAX_RETRIES: '31' }],
    ['MAX_RETRIES', { MAX_RETRIES: 'five' }],
    ['USAGE_READ_TIMEOUT_MS', { USAGE_READ_TIMEOUT_MS: '50' }],
    ['USAGE_READ_TIMEOUT_MS', { USAGE_READ_TIMEOUT_MS: 'soon' }],
  ])('%s in %j', (name, env) => {
    expect(configErrorFor(env).message).toContain(name);
  });

  it('names the service whose price is a JSON number', () => {
    expect(configErrorFor({ PRICING: '{"storage":0.05}' }).message).toContain('storage');
  });
});

describe('loadConfig result', () => {
  it('is frozen: assigning a setting throws and leaves it unchanged', () => {
    const c = loadConfig({});
    expect(Object.isFrozen(c)).toBe(true);
    expect(() => {
      (c as { grpcPort: number }).grpcPort = 1;
    }).toThrow(TypeError);
    expect(c.grpcPort).toBe(50051);
  });

  it('does not read process.env when given an explicit env', () => {
    const saved = process.env.GRPC_PORT;
    process.env.GRPC_PORT = '12345';
    try {
      expect(loadConfig({}).grpcPort).toBe(50051);
    } finally {
      if (saved === undefined) delete process.env.GRPC_PORT;
      else process.env.GRPC_PORT = saved;
    }
  });
});

describe('loadConfig security settings', () => {
  it('defaults to authentication off, plaintext, no insecure override', () => {
    const c = loadConfig({});
    expect(c.authTokensFile).toBeNull();
    expect(c.tls).toBeNull();
    expect(c.allowInsecure).toBe(false);
  });

  it('reads AUTH_TOKENS_FILE, trimmed, and treats a blank one as unset', () => {
    expect(loadConfig({ AUTH_TOKENS_FILE: ' /etc/billing/tokens.json ' }).authTokensFile).toBe('/etc/billing/tokens.json');
    expect(loadConfig({ AUTH_TOKENS_FILE: '  ' }).authTokensFile).toBeNull();
  });

  it('reads TLS certificate and key, and a client CA for mutual TLS', () => {
    expect(loadConfig({ TLS_CERT_FILE: '/tls/server.pem', TLS_KEY_FILE: '/tls/server.key' }).tls).toEqual({
      certFile: '/tls/server.pem',
      keyFile: '/tls/server.key',
      clientCaFile: null,
    });
    expect(
      loadConfig({ TLS_CERT_FILE: '/tls/server.pem', TLS_KEY_FILE: '/tls/server.key', TLS_CLIENT_CA_FILE: '/tls/ca.pem' }).tls,
    ).toEqual({ certFile: '/tls/server.pem', keyFile: '/tls/server.key', clientCaFile: '/tls/ca.pem' });
  });

  it.each([
    ['true', true],
    ['TRUE', true],
    [' true ', true],
    ['false', false],
    ['', false],
  ])('reads ALLOW_INSECURE=%j as %s', (raw, value) => {
    expect(loadConfig({ ALLOW_INSECURE: raw }).allowInsecure).toBe(value);
  });
});

describe('loadConfig transport limits', () => {
  it('defaults to 1 MiB in, 4 MiB out, 1000 streams, 500 connections idle for at most 5 min, 8 open-service calls per connection, 2 h keepalive with 20 s timeout, 30 min connection age + 30 s', () => {
    expect(loadConfig({}).limits).toEqual({
      maxReceiveMessageBytes: 1_048_576,
      maxSendMessageBytes: 4_194_304,
      maxConcurrentStreams: 1000,
      maxConnections: 500,
      maxConnectionIdleMs: 300_000,
      maxOpenCallsPerConnection: 8,
      keepaliveTimeMs: 7_200_000,
      keepaliveTimeoutMs: 20_000,
      maxConnectionAgeMs: 1_800_000,
      maxConnectionAgeGraceMs: 30_000,
    });
    expect(loadConfig({}).limits).toEqual(DEFAULT_GRPC_LIMITS);
  });

  it('reads every limit from its variable', () => {
    expect(
      loadConfig({
        MAX_RECEIVE_MESSAGE_BYTES: '65536',
        MAX_SEND_MESSAGE_BYTES: '131072',
        MAX_CONCURRENT_STREAMS: '64',
        MAX_CONNECTIONS: '20',
        MAX_CONNECTION_IDLE_MS: '60000',
        MAX_OPEN_CALLS_PER_CONNECTION: '2',
        KEEPALIVE_TIME_MS: '60000',
        KEEPALIVE_TIMEOUT_MS: '5000',
        MAX_CONNECTION_AGE_MS: '600000',
        MAX_CONNECTION_AGE_GRACE_MS: '0',
      }).limits,
    ).toEqual({
      maxReceiveMessageBytes: 65536,
      maxSendMessageBytes: 131072,
      maxConcurrentStreams: 64,
      maxConnections: 20,
      maxConnectionIdleMs: 60000,
      maxOpenCallsPerConnection: 2,
      keepaliveTimeMs: 60000,
      keepaliveTimeoutMs: 5000,
      maxConnectionAgeMs: 600000,
      maxConnectionAgeGraceMs: 0,
    });
  });

  it('freezes the limits', () => {
    expect(Object.isFrozen(loadConfig({}).limits)).toBe(true);
  });
});

describe('loadConfig rejects invalid security and limit settings with a ConfigError naming the variable', () => {
  it.each<[string, Env]>([
    ['TLS_KEY_FILE', { TLS_CERT_FILE: '/tls/server.pem' }],
    ['TLS_CERT_FILE', { TLS_KEY_FILE: '/tls/server.key' }],
    ['TLS_CERT_FILE', { TLS_CERT_FILE: '/tls/server.pem', TLS_KEY_FILE: ' ' }],
    ['TLS_CLIENT_CA_FILE', { TLS_CLIENT_CA_FILE: '/tls/ca.pem' }],
    ['ALLOW_INSECURE', { ALLOW_INSECURE: 'yes' }],
    ['ALLOW_INSECURE', { ALLOW_INSECURE: '1' }],
    ['MAX_RECEIVE_MESSAGE_BYTES', { MAX_RECEIVE_MESSAGE_BYTES: '1MiB' }],
    ['MAX_RECEIVE_MESSAGE_BYTES', { MAX_RECEIVE_MESSAGE_BYTES: '100' }],
    ['MAX_RECEIVE_MESSAGE_BYTES', { MAX_RECEIVE_MESSAGE_BYTES: '67108865' }],
    ['MAX_SEND_MESSAGE_BYTES', { MAX_SEND_MESSAGE_BYTES: '1024' }],
    ['MAX_SEND_MESSAGE_BYTES', { MAX_SEND_MESSAGE_BYTES: '-1' }],
    ['MAX_CONCURRENT_STREAMS', { MAX_CONCURRENT_STREAMS: '0' }],
    ['MAX_CONCURRENT_STREAMS', { MAX_CONCURRENT_STREAMS: 'many' }],
    ['MAX_CONNECTIONS', { MAX_CONNECTIONS: '0' }],
    ['MAX_CONNECTIONS', { MAX_CONNECTIONS: '100001' }],
    ['MAX_CONNECTIONS', { MAX_CONNECTIONS: '1e3' }],
    ['MAX_CONNECTION_IDLE_MS', { MAX_CONNECTION_IDLE_MS: '999' }],
    ['MAX_CONNECTION_IDLE_MS', { MAX_CONNECTION_IDLE_MS: 'off' }],
    ['MAX_CONNECTION_IDLE_MS', { MAX_CONNECTION_IDLE_MS: '604800001' }],
    ['MAX_OPEN_CALLS_PER_CONNECTION', { MAX_OPEN_CALLS_PER_CONNECTION: '0' }],
    ['MAX_OPEN_CALLS_PER_CONNECTION', { MAX_OPEN_CALLS_PER_CONNECTION: '1001' }],
    ['KEEPALIVE_TIME_MS', { KEEPALIVE_TIME_MS: '5' }],
    ['KEEPALIVE_TIMEOUT_MS', { KEEPALIVE_TIMEOUT_MS: '999' }],
    ['MAX_CONNECTION_AGE_MS', { MAX_CONNECTION_AGE_MS: '0' }],
    ['MAX_CONNECTION_AGE_MS', { MAX_CONNECTION_AGE_MS: '2147483648' }],
    ['MAX_CONNECTION_AGE_GRACE_MS', { MAX_CONNECTION_AGE_GRACE_MS: '1.5' }],
  ])('%s in %j', (name, env) => {
    expect(configErrorFor(env).message).toContain(name);
  });
});

describe('isLoopbackHost', () => {
  it.each(['127.0.0.1', '127.8.9.10', 'localhost', 'LocalHost', '::1', '[::1]', '0:0:0:0:0:0:0:1', '::ffff:127.0.0.1'])(
    '%s is loopback',
    (host) => {
      expect(isLoopbackHost(host)).toBe(true);
    },
  );

  it.each(['0.0.0.0', '::', '10.0.0.1', '128.0.0.1', '192.168.1.2', 'example.com', 'localhost.example.com', '::ffff:10.0.0.1', 'fe80::1%lo'])(
    '%s is not loopback',
    (host) => {
      expect(isLoopbackHost(host)).toBe(false);
    },
  );
});

describe('checkExposure (secure by default)', () => {
  const TLS = { TLS_CERT_FILE: '/tls/server.pem', TLS_KEY_FILE: '/tls/server.key' };

  it('allows anything on a loopback address, silently', () => {
    expect(checkExposure(loadConfig({ GRPC_HOST: '127.0.0.1' }))).toEqual([]);
    expect(checkExposure(loadConfig({ GRPC_HOST: '::1', ALLOW_INSECURE: 'true' }))).toEqual([]);
  });

  it('refuses a non-loopback address without AUTH_TOKENS_FILE, naming GRPC_HOST, AUTH_TOKENS_FILE and ALLOW_INSECURE', () => {
    for (const host of ['0.0.0.0', '::', '10.1.2.3', 'billing.internal']) {
      let thrown: unknown;
      try {
        checkExposure(loadConfig({ GRPC_HOST: host, ...TLS }));
      } catch (e) {
        thrown = e;
      }
      expect(thrown).toBeInstanceOf(ConfigError);
      expect((thrown as Error).message).toEqual(expect.stringContaining('GRPC_HOST'));
      expect((thrown as Error).message).toEqual(expect.stringContaining('AUTH_TOKENS_FILE'));
      expect((thrown as Error).message).toEqual(expect.stringContaining('ALLOW_INSECURE'));
    }
  });

  it('starts without authentication on ALLOW_INSECURE=true, with one INSECURE warning', () => {
    const warnings = checkExposure(loadConfig({ GRPC_HOST: '0.0.0.0', ALLOW_INSECURE: 'true' }));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(/^INSECURE: authentication is OFF/);
  });

  it('warns that tokens travel in clear text on a non-loopback address without TLS', () => {
    const warnings = checkExposure(loadConfig({ GRPC_HOST: '0.0.0.0', AUTH_TOKENS_FILE: '/t.json' }));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toContain('clear text');
  });

  it('is silent with tokens and TLS on a non-loopback address', () => {
    expect(checkExposure(loadConfig({ GRPC_HOST: '0.0.0.0', AUTH_TOKENS_FILE: '/t.json', ...TLS }))).toEqual([]);
  });
});

describe('metrics settings (METRICS_PORT, METRICS_HOST, METRICS_ALLOW_REMOTE)', () => {
  it('keeps metrics off when METRICS_PORT is unset or blank', () => {
    expect(loadConfig({}).metrics).toBeNull();
    expect(loadConfig({ METRICS_PORT: '  ' }).metrics).toBeNull();
  });

  it('listens on 127.0.0.1 at the given port, 0 meaning a free one', () => {
    expect(loadConfig({ METRICS_PORT: '9464' }).metrics).toEqual({ host: '127.0.0.1', port: 9464, allowRemote: false });
    expect(loadConfig({ METRICS_PORT: '0' }).metrics).toEqual({ host: '127.0.0.1', port: 0, allowRemote: false });
    expect(loadConfig({ METRICS_PORT: '9464', METRICS_HOST: ' ::1 ' }).metrics?.host).toBe('::1');
  });

  it.each(['-1', '65536', 'abc', '9464.5'])('refuses METRICS_PORT=%s, naming it', (port) => {
    expect(configErrorFor({ METRICS_PORT: port }).message).toContain('METRICS_PORT');
  });

  it('refuses METRICS_HOST without METRICS_PORT (metrics would silently stay off)', () => {
    expect(configErrorFor({ METRICS_HOST: '127.0.0.1' }).message).toMatch(/METRICS_HOST is set but METRICS_PORT is not/);
  });

  it('refuses the gRPC port for metrics on the same host', () => {
    expect(configErrorFor({ GRPC_PORT: '50051', METRICS_PORT: '50051' }).message).toMatch(/METRICS_PORT must differ from GRPC_PORT/);
    expect(loadConfig({ GRPC_PORT: '0', METRICS_PORT: '0' }).metrics?.port).toBe(0);
  });

  it('refuses a non-loopback METRICS_HOST without METRICS_ALLOW_REMOTE=true, naming both', () => {
    for (const host of ['0.0.0.0', '::', '10.1.2.3']) {
      let thrown: unknown;
      try {
        checkExposure(loadConfig({ METRICS_PORT: '9464', METRICS_HOST: host }));
      } catch (e) {
        thrown = e;
      }
      expect(thrown).toBeInstanceOf(ConfigError);
      expect((thrown as Error).message).toContain(`METRICS_HOST=${host}`);
      expect((thrown as Error).message).toContain('METRICS_ALLOW_REMOTE=true');
    }
  });

  it('ALLOW_INSECURE does not open metrics beyond loopback; METRICS_ALLOW_REMOTE=true does, with one warning', () => {
    expect(() => checkExposure(loadConfig({ METRICS_PORT: '9464', METRICS_HOST: '0.0.0.0', ALLOW_INSECURE: 'true' }))).toThrow(ConfigError);
    const warnings = checkExposure(loadConfig({ METRICS_PORT: '9464', METRICS_HOST: '0.0.0.0', METRICS_ALLOW_REMOTE: 'true' }));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toContain('METRICS_HOST=0.0.0.0');
  });

  it('is silent for metrics on loopback, whatever METRICS_ALLOW_REMOTE says', () => {
    expect(checkExposure(loadConfig({ METRICS_PORT: '9464', METRICS_HOST: 'localhost' }))).toEqual([]);
    expect(checkExposure(loadConfig({ METRICS_PORT: '9464', METRICS_ALLOW_REMOTE: 'true' }))).toEqual([]);
  });
});

describe('event stream settings (EVENT_RETENTION, EVENT_POLL_MS, EVENT_WATCH_BUFFER)', () => {
  it('keeps events 30 days, polls every 25 ms and lets a watcher have 10,000 events waiting by default', () => {
    expect(loadConfig({}).events).toEqual({ retentionMs: 30 * 86_400_000, pollMs: 25, watchBuffer: 10_000 });
    expect(loadConfig({ EVENT_RETENTION: ' ' }).events.retentionMs).toBe(30 * 86_400_000);
  });

  it('reads EVENT_RETENTION as a whole number and a unit: s, m, h or d', () => {
    expect(loadConfig({ EVENT_RETENTION: '30d' }).events.retentionMs).toBe(30 * 86_400_000);
    expect(loadConfig({ EVENT_RETENTION: '12h' }).events.retentionMs).toBe(12 * 3_600_000);
    expect(loadConfig({ EVENT_RETENTION: '90m' }).events.retentionMs).toBe(90 * 60_000);
    expect(loadConfig({ EVENT_RETENTION: '3600s' }).events.retentionMs).toBe(3_600_000);
  });

  it('refuses a retention without a unit, with a fraction or another unit, naming EVENT_RETENTION', () => {
    for (const raw of ['30', '1.5d', '2w', 'd', '-1d', '30 days']) {
      expect(configErrorFor({ EVENT_RETENTION: raw }).message).toMatch(/^EVENT_RETENTION must be a whole number and a unit/);
    }
  });

  it('refuses a retention under a minute or over ten years', () => {
    expect(configErrorFor({ EVENT_RETENTION: '59s' }).message).toMatch(/EVENT_RETENTION must be between 1m and 3650d/);
    expect(configErrorFor({ EVENT_RETENTION: '0d' }).message).toMatch(/EVENT_RETENTION must be between/);
    expect(configErrorFor({ EVENT_RETENTION: '3651d' }).message).toMatch(/EVENT_RETENTION must be between/);
    expect(loadConfig({ EVENT_RETENTION: '1m' }).events.retentionMs).toBe(60_000);
  });

  it('validates EVENT_POLL_MS (1-10000) and EVENT_WATCH_BUFFER (10-1000000) as whole numbers', () => {
    expect(loadConfig({ EVENT_POLL_MS: '5', EVENT_WATCH_BUFFER: '100' }).events).toMatchObject({ pollMs: 5, watchBuffer: 100 });
    expect(configErrorFor({ EVENT_POLL_MS: '0' }).message).toMatch(/EVENT_POLL_MS must be between 1 and 10000/);
    expect(configErrorFor({ EVENT_POLL_MS: '2.5' }).message).toMatch(/EVENT_POLL_MS must be a whole number/);
    expect(configErrorFor({ EVENT_WATCH_BUFFER: '9' }).message).toMatch(/EVENT_WATCH_BUFFER must be between 10 and 1000000/);
  });
});
