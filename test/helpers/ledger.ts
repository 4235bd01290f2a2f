import type { TestApp } from './harness';

/**
 * A credit written straight to the database (balance and ledger row in one
 * transaction), so that no settlement runs: records stay unpaid until a
 * charge the test triggers itself.
 */
export async function creditWithoutSettling(t: TestApp, userId: bigint, micros: bigint): Promise<void> {
  await t.app.orm.em.fork().transactional(async (tx) => {
    const [w] = await tx.execute<{ balance: string }[]>(
      `update wallets set balance = balance + cast(? as bigint) where user_id = ? returning cast(balance as text) as balance`,
      [micros.toString(), Number(userId)],
    );
    await tx.execute(
      `insert into wallet_transactions (user_id, type, amount, balance_after, created_at) values (?, 'CREDIT', cast(? as bigint), cast(? as bigint), 0)`,
      [Number(userId), micros.toString(), w.balance],
    );
  });
}
