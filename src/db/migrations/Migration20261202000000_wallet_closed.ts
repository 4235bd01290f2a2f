import { Migration } from '@mikro-orm/migrations';

/**
 * A wallet is closed when its user is deleted, on the wallet row itself. Every
 * credit and debit is a conditional UPDATE of that row (`closed_at is null`),
 * and deleting a user closes the wallet with one too (`balance = 0`), so on
 * PostgreSQL the two queue on the same row lock and whichever commits first
 * wins: a credit can never land in a deleted user's wallet. (A flag on the
 * users row could not do this: a concurrent UPDATE of wallets re-checks only
 * the wallet row after waiting, not a sub-select of users.)
 */
export class Migration20261202000000WalletClosed extends Migration {
  override up(): void {
    this.addSql(`alter table wallets add column closed_at bigint null`);
    this.addSql(
      `update wallets set closed_at = (select u.deleted_at from users u where u.id = wallets.user_id)
       where exists (select 1 from users u where u.id = wallets.user_id and u.deleted_at is not null)`,
    );
  }
}
