import { Migration } from '@mikro-orm/migrations';

/**
 * A RUNNING job run carries a lease: its process writes heartbeat_at while it
 * works, and any replica closes a run whose heartbeat is older than the lease
 * (its owner died, or lost the database for good).
 */
export class Migration20261202010000JobHeartbeat extends Migration {
  override up(): void {
    this.addSql(`alter table job_runs add column heartbeat_at bigint null`);
    this.addSql(`create index job_runs_running_idx on job_runs (heartbeat_at) where status = 'RUNNING'`);
  }
}
