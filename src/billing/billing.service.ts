/**
 * The billing engine's money path as callers see it: manual records, charges
 * on request, due retries and the settlement sweep. Records are written
 * through their door (./records.repository.ts); every charge attempt goes
 * through ./charging.ts, which asks the one charge decision.
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Logger } from 'pino';
import type { Database } from '../db/database';
import type { IdempotencyKeys } from '../db/idempotency';
import type { CallContext } from '../shared/context';
import type { Clock } from '../shared/clock';
import { invalidArgument, notFound } from '../shared/errors';
import { readPage, type PageRequest } from '../shared/paging';
import type { UsersRepository } from '../users/users.repository';
import type { BalanceAlerts } from '../wallets/balance-alerts';
import type { LedgerRepository } from '../wallets/ledger.repository';
import type { BillingRecordStatus } from './billing-record.entity';
import type { ChargeOutcome, ChargeResult, CreateRecordInput, RecordView, RetryCounts } from './billing.types';
import { addCounts, emptyRetryCounts, type Charging } from './charging';
import type { BillingRecordsRepository } from './records.repository';

export interface BillingService {
  /** Creates a MANUAL record and charges it at once. */
  createManualRecord(ctx: CallContext, input: CreateRecordInput): Promise<ChargeResult>;
  getRecord(ctx: CallContext, id: number): Promise<RecordView>;
  listRecords(
    ctx: CallContext,
    filter: { userId: number | null; status: BillingRecordStatus | null },
    page: PageRequest,
  ): Promise<{ items: RecordView[]; nextPageToken: string }>;
  /** ProcessBillingRecord: charge now whatever the schedule says (PAID is ALREADY_PAID). */
  processRecord(ctx: CallContext, id: number): Promise<ChargeResult>;
  /** Pays the user's unpaid records oldest first; reactivates a user suspended for non-payment once none is left. */
  settleUser(userId: number): Promise<{ counts: RetryCounts; paidRecordIds: number[] }>;
  /**
   * Settles every user with an unpaid record that their wallet can pay now
   * (what a failed settlement after a top-up left behind); not an attempt.
   */
  settleSweep(): Promise<RetryCounts>;
  /** True when settleSweep has something to settle. */
  hasSettleable(): Promise<boolean>;
  /** Charges records just created (their first attempt). */
  chargeNewRecords(ids: readonly number[]): Promise<RetryCounts>;
  /** Charges every PENDING record whose retry is due now. */
  processDueRetries(em: EntityManager): Promise<RetryCounts>;
  /** When the earliest scheduled retry is due, or null when none is. */
  nextDueTime(em: EntityManager): Promise<Date | null>;
}

export interface BillingDeps {
  db: Database;
  clock: Clock;
  log: Logger;
  records: BillingRecordsRepository;
  ledger: LedgerRepository;
  users: UsersRepository;
  charging: Charging;
  idempotency: IdempotencyKeys;
  /** A manual record lowers the available balance: evaluated in its transaction. */
  alerts: Pick<BalanceAlerts, 'evaluate'>;
}

const MAX_DESCRIPTION = 500;
/** Due retries read per look, and users a sweep settles per call. */
const DUE_BATCH = 5000;
const SWEEP_USERS = 1000;

function outcomeOf(status: BillingRecordStatus): ChargeOutcome {
  return status === 'PAID' ? 'CHARGED' : status === 'FAILED' ? 'FAILED' : 'RETRY_SCHEDULED';
}

export function createBillingService(deps: BillingDeps): BillingService {
  const { db, clock, log, records, ledger, users, charging, idempotency, alerts } = deps;

  /** One attempt, then the record as committed after it. */
  async function chargeAndView(id: number, trigger: 'new' | 'manual', signal?: AbortSignal): Promise<ChargeResult> {
    const result = await charging.chargeOne(id, trigger, signal);
    const view = await records.view(id);
    const outcome = result.outcome === 'SKIPPED' ? outcomeOf(view.record.status) : result.outcome;
    return { ...view, outcome, userSuspended: result.userSuspended };
  }

  const service: BillingService = {
    async createManualRecord(ctx, input) {
      if (input.amount <= 0n) throw invalidArgument('amount', 'NON_POSITIVE_AMOUNT', 'amount must be greater than zero');
      const description = input.description.trim();
      if (description === '') throw invalidArgument('description', 'MISSING_DESCRIPTION', 'description is required');
      if (description.length > MAX_DESCRIPTION) {
        throw invalidArgument('description', 'INVALID_DESCRIPTION', `description must be at most ${MAX_DESCRIPTION} characters`);
      }
      const key = idempotency.key('CreateBillingRecord', input.requestId, { userId: input.userId, amount: input.amount, description });
      // A short write: on SQLite, records created together share one COMMIT (group commit), as their first attempts do.
      const { id, replayed } = await db.groupWrite(async (tx) => {
        if (key) {
          const existing = await idempotency.claim(tx, key);
          if (existing !== null) return { id: existing, replayed: true };
        }
        await users.getLive(tx.em, input.userId);
        // A delete of this user waits for (or wins over) this record: it closes the wallet row first.
        if (!(await ledger.holdOpen(tx, input.userId))) throw notFound('USER_NOT_FOUND', `user ${input.userId} not found`);
        const now = clock.now();
        // Due at once: if the process dies before the first attempt, the retry scheduler makes it.
        const recordId = await records.createManual(tx, input.userId, input.amount, description, now);
        await alerts.evaluate(tx, [input.userId], now);
        if (key) await idempotency.complete(tx, key, recordId, now);
        return { id: recordId, replayed: false };
      }, ctx);
      if (replayed) {
        const view = await records.view(id);
        return { ...view, outcome: outcomeOf(view.record.status), userSuspended: false };
      }
      return chargeAndView(id, 'new');
    },

    getRecord: (_ctx, id) => records.view(id),

    listRecords: (ctx, filter, pageReq) => records.list(ctx.em, filter, readPage(pageReq, filter)),

    async processRecord(ctx, id) {
      // PAID is final: answer it from a read, without a write transaction.
      const view = await records.view(id);
      if (view.record.status === 'PAID') return { ...view, outcome: 'ALREADY_PAID', userSuspended: false };
      // Not made at all if the caller goes away before its turn; a new record's first attempt (above) is made
      // anyway, or the record would wait for the retry scheduler.
      return chargeAndView(id, 'manual', ctx.signal);
    },

    settleUser: (userId) => charging.settleUser(userId),

    async settleSweep() {
      const counts = emptyRetryCounts();
      const settleable = await records.settleableUsers(SWEEP_USERS);
      for (const userId of settleable) addCounts(counts, (await charging.settleUser(userId)).counts);
      if (counts.chargesSucceeded > 0) log.info({ users: settleable.length, ...counts }, 'settlement sweep');
      return counts;
    },

    async hasSettleable() {
      return (await records.settleableUsers(1)).length > 0;
    },

    chargeNewRecords: (ids) => charging.chargeMany(ids, 'new'),

    async processDueRetries(em) {
      const counts = emptyRetryCounts();
      const seen = new Set<number>();
      for (;;) {
        const ids = (await records.dueIds(em, clock.now(), DUE_BATCH)).filter((id) => !seen.has(id));
        if (ids.length === 0) return counts;
        for (const id of ids) seen.add(id);
        addCounts(counts, await charging.chargeMany(ids, 'retry'));
      }
    },

    nextDueTime: (em) => records.nextDueTime(em),
  };
  return service;
}
