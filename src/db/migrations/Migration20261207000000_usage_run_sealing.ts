import { Migration } from '@mikro-orm/migrations';

/**
 * An ingestion run seals its records in bounded transactions, so that no
 * write waits for all of them at once: the run is SEALING from the first of
 * them (the file is read to its end, every record prepared: the run is
 * decided and will bill everything) until the last, and after a crash the
 * next run finishes it instead of rolling it back. Its staging records are
 * found through a partial index (they are few, and only while a run is open).
 */
export class Migration20261207000000UsageRunSealing extends Migration {
  override up(): void {
    const pg = this.driver.getPlatform().constructor.name.startsWith('PostgreSql');
    const states = `check (state in ('STAGING', 'SEALING', 'SEALED', 'ROLLED_BACK'))`;
    if (pg) {
      this.addSql(`alter table usage_runs drop constraint usage_runs_state_check`);
      this.addSql(`alter table usage_runs add constraint usage_runs_state_check ${states}`);
    } else {
      // SQLite cannot change a check constraint: the table is copied (nothing references it).
      this.addSql(`create table usage_runs_next (job_run_id bigint primary key, first_usage_id bigint not null, state text not null ${states})`);
      this.addSql(`insert into usage_runs_next (job_run_id, first_usage_id, state) select job_run_id, first_usage_id, state from usage_runs`);
      this.addSql(`drop table usage_runs`);
      this.addSql(`alter table usage_runs_next rename to usage_runs`);
    }
    this.addSql(`create index billing_records_staging_idx on billing_records (job_run_id, id) where staging`);
  }
}
