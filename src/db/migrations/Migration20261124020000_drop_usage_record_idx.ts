import { Migration } from '@mikro-orm/migrations';

/**
 * usage_logs_record_idx served no query (lists page by id, the invariant
 * checker aggregates over the whole table) and cost every ingested entry an
 * extra random-key B-tree insert: the raw-driver floor for 1M entries went
 * from 20.6 s to 17.8 s without it (npm run bench, see README Performance).
 */
export class Migration20261124020000DropUsageRecordIdx extends Migration {
  override up(): void {
    this.addSql(`drop index if exists usage_logs_record_idx`);
  }
}
