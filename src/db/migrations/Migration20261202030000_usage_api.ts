import { Migration } from '@mikro-orm/migrations';

/**
 * Usage over gRPC:
 * - usage_logs.source: FILE or API;
 * - usage_logs_user_time_idx: a user's usage by time, for summaries;
 * - usage_pending_totals: per user and service, the exact total quantity of
 *   PENDING usage of a live user (usage recorded, not billed yet), kept in the
 *   transactions that record, bill or roll back usage, so the available
 *   balance is one read. A total may pass 2^63 micro-units, so it is kept in
 *   two parts, quantity_hi x 2^32 + quantity_lo, each changed by plain
 *   additions (set-based upserts) and joined when read.
 */
export class Migration20261202030000UsageApi extends Migration {
  override up(): void {
    this.addSql(`alter table usage_logs add column source text not null default 'FILE'`);
    this.addSql(`create index usage_logs_user_time_idx on usage_logs (user_id, usage_at)`);
    this.addSql(`create table usage_pending_totals (
      user_id bigint not null,
      service text not null,
      quantity_hi bigint not null,
      quantity_lo bigint not null,
      entries bigint not null,
      primary key (user_id, service)
    )`);
    // The PENDING usage of live users already stored.
    this.addSql(`insert into usage_pending_totals (user_id, service, quantity_hi, quantity_lo, entries)
      select l.user_id, l.service, sum(l.quantity / 4294967296), sum(l.quantity % 4294967296), count(*)
      from usage_logs l
      where l.status = 'PENDING' and exists (select 1 from wallets w where w.user_id = l.user_id and w.closed_at is null)
      group by l.user_id, l.service`);
  }
}
