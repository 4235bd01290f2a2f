import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as jobPb from '../../generated/billing/v1/job_service';
import { createTestDatabase, onPostgres } from '../helpers/database';
import { call, startTestApp } from '../helpers/harness';

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

  it('a run left RUNNING by a process that died is closed as FAILED at the next start on SQLite; replicas leave it to its owner', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-jobs-'));
    const db = await createTestDatabase(dir);
    try {
      const t = await startTestApp(db.env);
      await t.app.orm.em.fork().execute(
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
