import { Migration } from '@mikro-orm/migrations';

/**
 * Ingestion commits in bounded chunks (so other writes never wait for a whole
 * file): a run's usage records are reserved `staging` while their rows are
 * stored, and sealed with their amounts and lines when the file has been read
 * to its end. `usage_runs` tells, after a crash, which runs never sealed: the
 * next run rolls their rows and staging records back and reads the file again.
 */
export class Migration20261202020000IngestionChunks extends Migration {
  override up(): void {
    const pg = this.driver.getPlatform().constructor.name.startsWith('PostgreSql');
    this.addSql(`alter table billing_records add column staging ${pg ? 'boolean not null default false' : 'integer not null default 0'}`);
    this.addSql(`create table usage_runs (
      job_run_id bigint primary key,
      first_usage_id bigint not null,
      state text not null check (state in ('STAGING', 'SEALED', 'ROLLED_BACK'))
    )`);
  }
}
