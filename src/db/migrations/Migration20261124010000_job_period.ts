import { Migration } from '@mikro-orm/migrations';

/**
 * Scheduled runs claim their period: one row per (job, cron tick) across all
 * replicas sharing the database, so the hourly ingestion runs once whichever
 * replica's cron fires first.
 */
export class Migration20261124010000JobPeriod extends Migration {
  override up(): void {
    this.addSql(`alter table job_runs add column period_key text null`);
    this.addSql(`create unique index job_runs_period_unique on job_runs (period_key)`);
  }
}
