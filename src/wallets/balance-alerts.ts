/**
 * Balance alerts: a user's available balance against their low-balance
 * threshold (their own, or the deployment's LOW_BALANCE_THRESHOLD), written
 * as events once per crossing (./balance-alert-rule.ts says which).
 *
 * Every transaction that moves an available balance calls `evaluate` after
 * its change, before it commits: usage recorded over gRPC, a credit, a manual
 * record, the sealing of a usage-file run, a new threshold. A charge moves the
 * balance and the unpaid records by the same amount (the available balance
 * does not move) and evaluates nothing.
 *
 * Exactly once under concurrency (PostgreSQL; SQLite has one writer):
 * evaluate first share-locks the users' wallets (no credit or charge of them
 * can commit before this transaction does, so the balance read and the
 * unpaid records read agree), then locks their balance_alerts rows (so
 * evaluations of a user run one after the other), and only then reads the
 * pending usage and unpaid records, each read a fresh READ COMMITTED
 * snapshot: everything committed before, and the transaction's own change.
 * Another transaction that moved the available balance and has not committed
 * yet waits for the row lock, and reads this one's change once it has it.
 * Lock order: wallets (share, or the credit's update) -> balance_alerts, in
 * user order, and nothing is locked after it but the events' ordering lock
 * at COMMIT, so the order is the same everywhere and nothing waits in a
 * circle (charges lock records -> wallets and never an alert row).
 */
import type { Database, Tx } from '../db/database';
import type { BillingRecordsRepository } from '../billing/records.repository';
import type { EventsRepository } from '../events/events.repository';
import type { NewEvent } from '../events/events.types';
import type { Clock } from '../shared/clock';
import { notFound } from '../shared/errors';
import type { UsageLogsRepository } from '../usage/usage-logs.repository';
import { availableBalance } from './available';
import { alertEvents, nextAlertState, type AlertState } from './balance-alert-rule';
import type { BalanceAlertsRepository } from './balance-alerts.repository';
import type { LedgerRepository } from './ledger.repository';

export interface BalanceAlertView {
  userId: number;
  /** The threshold in force, in micros. */
  threshold: bigint;
  /** True when it is the deployment's (the user has none of their own). */
  isDefault: boolean;
  /** The alert's state (a latch, see AlertState), as of the last change of the available balance. */
  state: AlertState;
  /** The available balance now. */
  available: bigint;
}

export interface BalanceAlerts {
  /**
   * In `tx`, after a change of these users' available balances: writes each
   * crossing's events and the new state. Returns the available balance of
   * each live user (absent: deleted or unknown, nothing evaluated).
   */
  evaluate(tx: Tx, userIds: readonly number[], now: Date): Promise<Map<number, bigint>>;
  /** Sets the user's own threshold (null: the deployment's again) and evaluates it at once. */
  set(userId: number, threshold: bigint | null, signal?: AbortSignal): Promise<BalanceAlertView>;
  get(userId: number): Promise<BalanceAlertView>;
}

export interface BalanceAlertsDeps {
  db: Database;
  clock: Clock;
  alerts: BalanceAlertsRepository;
  ledger: LedgerRepository;
  usageLogs: UsageLogsRepository;
  records: BillingRecordsRepository;
  events: EventsRepository;
  pricing: ReadonlyMap<string, bigint>;
  /** LOW_BALANCE_THRESHOLD, in micros. */
  defaultThreshold: bigint;
}

export function createBalanceAlerts(deps: BalanceAlertsDeps): BalanceAlerts {
  const { db, clock, alerts, ledger, usageLogs, records, events, pricing, defaultThreshold } = deps;

  async function evaluate(tx: Tx, userIds: readonly number[], now: Date): Promise<Map<number, bigint>> {
    const available = new Map<number, bigint>();
    if (userIds.length === 0) return available;
    const balances = await ledger.shareBalances(tx, userIds);
    const live = [...balances.keys()].sort((a, b) => a - b);
    if (live.length === 0) return available;
    const rows = await alerts.lock(tx, live, now);
    const totals = await usageLogs.pendingTotalsOf(tx, live);
    const unpaid = await records.unpaidTotals(tx, live);
    const written: NewEvent[] = [];
    for (const userId of live) {
      const value = availableBalance(balances.get(userId)!, totals.get(userId)!, unpaid.get(userId)!, pricing);
      available.set(userId, value);
      const row = rows.get(userId)!;
      const threshold = row.threshold ?? defaultThreshold;
      const next = nextAlertState(row.state, value, threshold);
      if (next === row.state) continue;
      written.push(...alertEvents(userId, row.state, next, value, threshold));
      await alerts.moveState(tx, userId, next, now);
    }
    await events.append(tx, written, now);
    return available;
  }

  async function view(userId: number): Promise<BalanceAlertView> {
    const [wallet, totals, unpaid, row] = await db.snapshot(
      async (read) =>
        [await ledger.read(userId, read), await usageLogs.pendingTotals(userId, read), await records.unpaidTotal(userId, read), await alerts.read(userId, read)] as const,
    );
    if (!wallet) throw notFound('USER_NOT_FOUND', `user ${userId} not found`);
    return {
      userId,
      threshold: row?.threshold ?? defaultThreshold,
      isDefault: row?.threshold == null,
      state: row?.state ?? 'OK',
      available: availableBalance(wallet.balance, totals, unpaid, pricing),
    };
  }

  return {
    evaluate,

    async set(userId, threshold, signal) {
      await db.transaction(
        async (tx) => {
          // A live user's wallet, share-locked first (the lock order of evaluate): a delete waits or wins.
          if ((await ledger.shareBalances(tx, [userId])).size === 0) throw notFound('USER_NOT_FOUND', `user ${userId} not found`);
          const now = clock.now();
          await alerts.setThreshold(tx, userId, threshold, now);
          await evaluate(tx, [userId], now);
        },
        { signal },
      );
      return view(userId);
    },

    get: view,
  };
}
