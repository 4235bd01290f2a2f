/**
 * Benchmark entry: `npm run bench [-- options]`.
 *
 *   --quick                 100k entries only, shorter RPC runs
 *   --only ingest,rpc,...   parts to run (ingest, ingest-load, rpc, retries, growth, usage-api, events; default all)
 *   --db sqlite|postgres    database (postgres: a fresh database from TEST_PG_ADMIN_URL)
 *   --replicas N            PostgreSQL: N service processes on one database for the RPC part
 *   --seconds S             duration of each RPC load run (default 10, quick 4)
 *   --log-level L           the service's LOG_LEVEL (default info, as deployed)
 *   --usage-writer W        the service's USAGE_WRITER, thread or inline (default: the service's, thread on SQLite)
 *   --sizes N,M             ingestion sizes (default 100000,1000000; quick 100000; ingest-load takes the largest, default 1000000)
 *   --formats json,ndjson   ingestion formats (default both; ingest-load takes the first, default ndjson)
 *   --floor-keys            ingest: also the raw floor with an integer identity index and with none (SQLite)
 *   --out PATH              results file (default ./bench-results.json)
 *
 * Prints one table per part and writes everything to bench-results.json.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ALL_PARTS, log, snapshotDist, table, tmpWorkDir, type BenchOptions, type Part } from './common';
import { runGrowth } from './growth';
import { runIngest } from './ingest';
import { LOAD_IN_FLIGHT, runIngestLoad } from './ingest-load';
import { runRetries } from './retries';
import { runRpc } from './rpc';
import { runEvents } from './events';
import { runUsageApi } from './usage-api';

export function parseArgs(argv: string[]): BenchOptions {
  const opts: BenchOptions = {
    quick: false,
    only: [...ALL_PARTS],
    db: 'sqlite',
    replicas: 1,
    out: path.resolve('bench-results.json'),
    logLevel: 'info',
    rpcSeconds: 0,
    workDir: '',
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = (): string => {
      const v = arg.includes('=') ? arg.slice(arg.indexOf('=') + 1) : argv[++i];
      if (v === undefined) throw new Error(`${arg} needs a value`);
      return v;
    };
    const name = arg.split('=')[0];
    if (name === '--quick') opts.quick = true;
    else if (name === '--only') {
      const parts = value().split(',').map((p) => p.trim()).filter(Boolean);
      for (const p of parts) if (!ALL_PARTS.includes(p as Part)) throw new Error(`unknown part ${p} (${ALL_PARTS.join(', ')})`);
      opts.only = parts as Part[];
    } else if (name === '--db') {
      const db = value();
      if (db !== 'sqlite' && db !== 'postgres') throw new Error('--db is sqlite or postgres');
      opts.db = db;
    } else if (name === '--replicas') opts.replicas = Math.max(1, Number(value()));
    else if (name === '--seconds') opts.rpcSeconds = Number(value());
    else if (name === '--log-level') opts.logLevel = value();
    else if (name === '--usage-writer') {
      const w = value();
      if (w !== 'thread' && w !== 'inline') throw new Error('--usage-writer is thread or inline');
      opts.usageWriter = w;
    }
    else if (name === '--sizes') opts.sizes = value().split(',').map(Number);
    else if (name === '--formats') opts.formats = value().split(',') as BenchOptions['formats'];
    else if (name === '--floor-keys') opts.floorKeys = true;
    else if (name === '--out') opts.out = path.resolve(value());
    else throw new Error(`unknown option ${arg}`);
  }
  if (opts.replicas > 1 && opts.db !== 'postgres') throw new Error('--replicas needs --db postgres (SQLite is one writer)');
  if (!opts.rpcSeconds) opts.rpcSeconds = opts.quick ? 4 : 10;
  return opts;
}

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2));
  opts.workDir = tmpWorkDir();
  snapshotDist(opts.workDir);
  log(`options ${JSON.stringify(opts)}`);
  const results: Record<string, unknown> = {
    startedAt: new Date().toISOString(),
    machine: { cpus: os.cpus().length, cpu: os.cpus()[0]?.model, memMb: Math.round(os.totalmem() / 1048576), node: process.version },
    options: { ...opts, workDir: undefined },
  };
  const out: string[] = [];
  const save = () => fs.writeFileSync(opts.out, JSON.stringify(results, null, 2) + '\n');
  try {
    if (opts.only.includes('ingest')) {
      const rows = await runIngest(opts);
      results.ingest = rows;
      out.push(table(`Ingestion (ProcessLogs end to end, ${opts.db}; floor = raw better-sqlite3 script, same rows, one transaction)`, rows as never));
      save();
    }
    if (opts.only.includes('ingest-load')) {
      const r = await runIngestLoad(opts);
      results.ingestLoad = r;
      out.push(table(`Ingestion under load (${opts.db}; ProcessLogs alone and with AddFunds + GetBalance at ${LOAD_IN_FLIGHT} in flight each, fresh database each)`, r.rows as never));
      out.push(table('Ingestion under load: latency of the calls (grpc-js client, ms; floor server, idle = the same load on raw better-sqlite3 behind grpc-js, same file; idle = on the service just before)', r.load as never));
      save();
    }
    if (opts.only.includes('rpc')) {
      const r = await runRpc(opts);
      results.rpc = r;
      out.push(table(`RPC under h2load (${opts.db}, ${opts.replicas} replica(s), ${opts.rpcSeconds} s each; ratio = calls/s / trivial grpc-js handler at the same concurrency)`, r.h2load as never));
      out.push(table('RPC through a grpc-js client (latency at low concurrency)', r.client as never));
      if (r.notes.length) out.push(r.notes.map((n) => `note: ${n}`).join('\n'));
      save();
    }
    if (opts.only.includes('retries')) {
      const r = await runRetries(opts);
      results.retries = r;
      out.push(table('Retries: records due at the same moment', [r] as never));
      save();
    }
    if (opts.only.includes('growth')) {
      const r = await runGrowth(opts);
      results.growth = r;
      out.push(table('Growth: ingestion at 1x and 10x', r.ingest as never));
      out.push(table('Growth: ListUsageLogs latency by page depth (walk: page_size 500; first/deep: page_size 50, median of 30; grpc-js client, ms)', r.list as never));
      save();
    }
    if (opts.only.includes('usage-api')) {
      const r = await runUsageApi(opts);
      results.usageApi = r;
      out.push(table(`Usage over gRPC (${opts.db}, ${opts.rpcSeconds} s each; latency: RecordUsage call / StreamUsage send -> ack, both after the commit)`, r.rows as never));
      out.push(table("GetUsageSummary of one user's month (ms, 200 calls each)", [r.summary] as never));
      if (r.notes.length) out.push(r.notes.map((n) => `note: ${n}`).join('\n'));
      save();
    }
    if (opts.only.includes('events')) {
      const r = await runEvents(opts);
      results.events = r;
      out.push(table(`Events: commit-to-watcher latency (${opts.db}, ${opts.rpcSeconds} s; grpc-js clients, ms)`, [r.latency] as never));
      out.push(table('Events: service RSS with idle watchers', [r.memory] as never));
      if (r.notes.length) out.push(r.notes.map((n) => `note: ${n}`).join('\n'));
      save();
    }
  } finally {
    results.finishedAt = new Date().toISOString();
    save();
    process.stdout.write(out.join('\n') + '\n');
    process.stdout.write(`results: ${opts.out}\n`);
    // BENCH_KEEP=1 keeps the scratch directory (service logs, databases) for a look afterwards.
    if (process.env.BENCH_KEEP) log(`kept ${opts.workDir}`);
    else fs.rmSync(opts.workDir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(1);
});
