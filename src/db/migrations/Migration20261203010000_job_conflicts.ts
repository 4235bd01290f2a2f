import { Migration } from '@mikro-orm/migrations';

/** job_runs.entries_conflict: file entries whose id was recorded before with other content (not stored). */
export class Migration20261203010000JobConflicts extends Migration {
  override up(): void {
    this.addSql(`alter table job_runs add column entries_conflict bigint not null default 0`);
  }
}
