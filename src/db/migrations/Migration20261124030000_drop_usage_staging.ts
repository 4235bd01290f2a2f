import { Migration } from '@mikro-orm/migrations';

/**
 * usage_staging held a run's entries on their way into usage_logs while the
 * occurrence numbers were computed in SQL. Ingestion now writes each row once,
 * in its final state (see src/usage/ingest.service.ts), so nothing uses it.
 */
export class Migration20261124030000DropUsageStaging extends Migration {
  override up(): void {
    this.addSql(`drop table if exists usage_staging`);
  }
}
