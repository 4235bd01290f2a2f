import { createEventsRepository } from '../../src/events/events.repository';
import { createLedgerRepository } from '../../src/wallets/ledger.repository';
import type { TestApp } from './harness';

/**
 * A credit through the ledger's door (balance and ledger row in one
 * transaction), but without the settlement AddFunds runs after it: records
 * stay unpaid until a charge the test triggers itself (or the sweep). Its
 * wallet.credited event is written as AddFunds writes it.
 */
export async function creditWithoutSettling(t: TestApp, userId: bigint, micros: bigint): Promise<void> {
  const ledger = createLedgerRepository(t.app.db, createEventsRepository(t.app.db));
  const result = await t.app.db.transaction((tx) => ledger.credit(tx, Number(userId), micros, null, new Date()));
  if (!result.ok) throw new Error(`credit refused: ${result.why}`);
}
