import { Migration } from '@mikro-orm/migrations';

/**
 * A database that held changes before the event stream existed has no events
 * for them: the retention mark starts past the latest of those changes, so
 * the invariant checker expects events only for what happens from now on
 * (as if the retention had deleted the older ones). A new, empty database
 * keeps the mark at 0. Runs once, before any event is written.
 */
export class Migration20261203000500EventsMark extends Migration {
  override up(): void {
    this.addSql(`update event_retention set pruned_before = coalesce((
        select max(x.at) + 1 from (
          select max(created_at) as at from wallet_transactions
          union all select max(updated_at) from billing_records
          union all select max(paid_at) from billing_records
          union all select max(updated_at) from users
          union all select max(deleted_at) from users
          union all select max(ended_at) from job_runs
        ) x
      ), 0)
      where id = 1 and pruned_through = 0 and not exists (select 1 from events)`);
  }
}
