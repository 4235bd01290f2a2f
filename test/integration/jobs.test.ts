import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as jobPb from '../../generated/billing/v1/job_service';
import { createTestDatabase, onPostgres } from '../helpers/database';
import { Client } from 'pg';
import { call, startTestApp, type TestApp } from '../helpers/harness';
import { writeNdjson } from '../helpers/usage';

describe('job runs', () => {
  it('ListJobRuns pages through runs in id order', async () => {
    const t = await startTestApp();
    try {
      for (let i = 0; i < 3; i++) await call(t.jobs, 'processRetries', {});
      const first = await call(t.jobs, 'listJobRuns', { pageSize: 2, pageToken: '' });
      const second = await call(t.jobs, 'listJobRuns', { pageSize: 2, pageToken: first.nextPageToken });
      expect([...first.jobRuns, ...second.jobRuns].map((r) => r.id)).toEqual([1n, 2n, 3n]);
      expect(second.nextPageToken).toBe('');
      expect(first.jobRuns.every((r) => r.kind === jobPb.JobKind.JOB_KIND_PROCESS_RETRIES && r.trigger === 'rpc')).toBe(true);
    } finally {
      await t.stop();
    }
  });

  async function waitFor<T>(read: () => Promise<T>, done: (v: T) => boolean, ms = 20_000): Promise<T> {
    const until = Date.now() + ms;
    for (;;) {
      const v = await read();
      if (done(v) || Date.now() > until) return v;
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  const runs = async (t: TestApp) => (await call(t.jobs, 'listJobRuns', { pageSize: 0, pageToken: '' })).jobRuns;

  it('a RUNNING run whose process stopped renewing its lease (a replica that died) is closed as FAILED by any process', async () => {
    const t = await startTestApp({}, { jobLeaseMs: 1000 });
    try {
      const now = Date.now();
      // Another replica's run: its last heartbeat was 5 s ago. And a live one of another replica, renewed just now.
      await t.app.db.fork().execute(
        `insert into job_runs (kind, status, trigger, started_at, heartbeat_at) values ('PROCESS_LOGS', 'RUNNING', 'cron', ?, ?), ('PROCESS_LOGS', 'RUNNING', 'rpc', ?, ?)`,
        [now - 60_000, now - 5_000, now, now + 60_000],
      );
      const [dead, live] = await waitFor(
        () => runs(t),
        (rs) => rs[0].status !== jobPb.JobRunStatus.JOB_RUN_STATUS_RUNNING,
      );
      expect(dead.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_FAILED);
      expect(dead.errorMessage).toMatch(/^abandoned: no heartbeat/);
      expect(dead.endTime).toBeInstanceOf(Date);
      expect(live.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_RUNNING);
    } finally {
      await t.stop();
    }
  });

  it('a run renews its lease while it works, so a long run is never taken for abandoned', async () => {
    const t = await startTestApp({}, { jobLeaseMs: 200 });
    try {
      // Enough usage that ingestion takes well over the lease.
      const entries = Array.from({ length: 60_000 }, (_, i) => ({ userId: 1 + (i % 50), service: 'api-calls', quantity: 1, timestamp: '2024-01-15T10:00:00Z', id: `L${i}` }));
      writeNdjson(path.join(t.dir, 'usage-logs.json'), entries);
      const run = (await call(t.jobs, 'processLogs', {}, { deadlineMs: 120_000 })).jobRun!;
      expect([run.status, run.errorMessage]).toEqual([jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED, '']);
      expect(run.entriesRead).toBe(60_000n);
    } finally {
      await t.stop();
    }
  });

  (onPostgres ? it : it.skip)('PostgreSQL: a run cut off by a database restart still ends FAILED with its error, never stays RUNNING', async () => {
    const t = await startTestApp({}, { jobLeaseMs: 2000 });
    const dbName = new URL(t.app.config.database.kind === 'postgresql' ? t.app.config.database.url : '').pathname.slice(1);
    const admin = new Client({ connectionString: process.env.TEST_PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres' });
    await admin.connect();
    try {
      const entries = Array.from({ length: 200_000 }, (_, i) => ({ userId: 1, service: 'api-calls', quantity: 1, timestamp: '2024-01-15T10:00:00Z', id: `R${i}` }));
      writeNdjson(path.join(t.dir, 'usage-logs.json'), entries);
      const pending = call(t.jobs, 'processLogs', {}, { deadlineMs: 120_000 }).catch((err: Error) => err);
      await waitFor(() => runs(t), (rs) => rs.length > 0, 10_000);
      await new Promise((r) => setTimeout(r, 300));
      // "Restart" this database: refuse new connections and end every open one for 3 s.
      await admin.query(`alter database ${dbName} with allow_connections false`);
      await admin.query(`select pg_terminate_backend(pid) from pg_stat_activity where datname = $1`, [dbName]);
      await new Promise((r) => setTimeout(r, 3000));
      await admin.query(`alter database ${dbName} with allow_connections true`);
      await pending;
      const [run] = await waitFor(
        () => runs(t),
        (rs) => rs[0].status !== jobPb.JobRunStatus.JOB_RUN_STATUS_RUNNING,
      );
      expect(run.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_FAILED);
      expect(run.errorMessage).toMatch(/database unavailable/);
      expect(run.endTime).toBeInstanceOf(Date);
    } finally {
      await admin.query(`alter database ${dbName} with allow_connections true`).catch(() => undefined);
      await admin.end();
      await t.stop();
    }
  });

  it('a run left RUNNING by a process that died is closed as FAILED at the next start on SQLite; replicas leave it to its owner', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-jobs-'));
    const db = await createTestDatabase(dir);
    try {
      const t = await startTestApp(db.env);
      await t.app.db.fork().execute(
        `insert into job_runs (kind, status, trigger, started_at) values ('PROCESS_LOGS', 'RUNNING', 'rpc', ?)`,
        [Date.now()],
      );
      await t.app.stop();
      const again = await startTestApp(db.env);
      try {
        const { jobRuns } = await call(again.jobs, 'listJobRuns', { pageSize: 0, pageToken: '' });
        if (onPostgres) {
          expect(jobRuns[0].status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_RUNNING);
        } else {
          expect(jobRuns[0].status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_FAILED);
          expect(jobRuns[0].errorMessage).toMatch(/^interrupted/);
          expect(jobRuns[0].endTime).toBeInstanceOf(Date);
        }
      } finally {
        await again.app.stop();
      }
    } finally {
      await db.drop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
