/**
 * The billing engine's money path: records, charges, retries, settlement and
 * suspension. A charge is one transaction: a conditional debit of the wallet
 * (never below zero), a DEBIT ledger row (unique per record) and the record's
 * move to PAID guarded by the state it was read in. A record is therefore
 * charged at most once, whoever triggers it, however concurrently.
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Logger } from 'pino';
import { checkRequestId, findIdempotent, requestHash, saveIdempotent } from '../db/idempotency';
import { isUniqueViolation } from '../db/errors';
import { isPostgres } from '../db/platform';
import { epochMs, int64 } from '../db/types';
import type { Clock } from '../shared/clock';
import { invalidArgument, notFound } from '../shared/errors';
import { pageOf, readPage } from '../shared/paging';
import { UsageLog } from '../usage/usage-log.entity';
import { getLiveUser } from '../users/users.service';
import { debitWallet } from '../wallets/wallets.service';
import { BillingRecord, LineItem, type BillingRecordStatus } from './billing-record.entity';
import type { BillingService, ChargeOutcome, ChargeResult, RecordView, RetryCounts } from './billing.types';
import { nextAttemptDelayMs, type RetryPolicy } from './retry-policy';

export interface BillingDeps extends RetryPolicy {
  clock: Clock;
  log: Logger;
  pricing: ReadonlyMap<string, bigint>;
  /** Told whenever a retry is scheduled, so the in-process scheduler can wake up in time. */
  onRetryScheduled?: (at: Date) => void;
}

/** Why a charge attempt runs: it decides what a short balance does. */
type ChargeMode =
  | 'new' // first attempt of a new record; a failure counts and schedules retry 1
  | 'retry' // the scheduler: only if still PENDING and due
  | 'manual' // ProcessBillingRecord: now, whatever the schedule
  | 'settle'; // after a top-up: a short balance changes nothing

type RecordRow = {
  id: number | string;
  user_id: number | string;
  amount: string;
  status: BillingRecordStatus;
  attempt_count: number | string;
  next_attempt_at: number | string | null;
};

/** The record changed under us between read and write; read again. */
class StaleRecord extends Error {}

const MAX_DESCRIPTION = 500;
export const INSUFFICIENT_FUNDS = 'INSUFFICIENT_FUNDS';

const emptyRetryCounts = (): RetryCounts => ({ chargesSucceeded: 0, retriesScheduled: 0, recordsFailed: 0, usersSuspended: 0 });

function tally(counts: RetryCounts, r: { outcome: ChargeOutcome | 'SKIPPED'; userSuspended: boolean }): void {
  if (r.outcome === 'CHARGED') counts.chargesSucceeded++;
  else if (r.outcome === 'RETRY_SCHEDULED') counts.retriesScheduled++;
  else if (r.outcome === 'FAILED') counts.recordsFailed++;
  if (r.userSuspended) counts.usersSuspended++;
}

export function createBillingService(deps: BillingDeps): BillingService {
  const { clock, log } = deps;

  async function view(em: EntityManager, id: number): Promise<RecordView> {
    const record = await em.findOne(BillingRecord, id, { refresh: true });
    if (!record) throw notFound('BILLING_RECORD_NOT_FOUND', `billing record ${id} not found`);
    const lineItems = await em.find(LineItem, { billingRecordId: id }, { orderBy: { id: 'asc' } });
    return { record, lineItems };
  }

  async function readRow(tx: EntityManager, id: number, mode: ChargeMode, now: Date): Promise<RecordRow | undefined> {
    const due = mode === 'retry' ? ` and status = 'PENDING' and next_attempt_at <= ${now.getTime()}` : '';
    // PostgreSQL: lock the row so concurrent chargers queue; the scheduler skips rows another replica holds.
    const lock = isPostgres(tx) ? (mode === 'retry' ? ' for update skip locked' : ' for update') : '';
    const rows = await tx.execute<RecordRow[]>(
      `select id, user_id, cast(amount as text) as amount, status, attempt_count, next_attempt_at
       from billing_records where id = ?${due}${lock}`,
      [id],
    );
    return rows[0];
  }

  /** Moves the record on, guarded by the status and attempt count it was read with. */
  async function updateRecord(tx: EntityManager, row: RecordRow, set: string, params: unknown[]): Promise<void> {
    const res = await tx.execute<{ affectedRows: number }>(
      `update billing_records set ${set} where id = ? and status = ? and attempt_count = ?`,
      [...params, row.id, row.status, row.attempt_count],
      'run',
    );
    if (res.affectedRows !== 1) throw new StaleRecord();
  }

  /** Reactivates a user suspended for non-payment once nothing is unpaid. */
  async function reactivateIfSettled(tx: EntityManager, userId: number, now: Date): Promise<void> {
    await tx.execute(
      `update users set status = 'ACTIVE', suspension_reason = '', suspended_for_non_payment = ?, updated_at = ?
       where id = ? and status = 'SUSPENDED' and suspended_for_non_payment = ?
         and not exists (select 1 from billing_records where user_id = ? and status <> 'PAID')`,
      [false, now.getTime(), userId, true, userId],
      'run',
    );
  }

  async function attempt(
    em: EntityManager,
    id: number,
    mode: ChargeMode,
  ): Promise<{ outcome: ChargeOutcome | 'SKIPPED'; userSuspended: boolean; retryAt: Date | null }> {
    return em.transactional(async (tx) => {
      const now = clock.now();
      const row = await readRow(tx, id, mode, now);
      if (!row) {
        if (mode === 'retry') return { outcome: 'SKIPPED', userSuspended: false, retryAt: null };
        throw notFound('BILLING_RECORD_NOT_FOUND', `billing record ${id} not found`);
      }
      if (row.status === 'PAID') return { outcome: 'ALREADY_PAID', userSuspended: false, retryAt: null };
      // The scheduler may have made the first attempt of a record due at creation already.
      if (mode === 'new' && Number(row.attempt_count) > 0) return { outcome: 'SKIPPED', userSuspended: false, retryAt: null };
      const userId = Number(row.user_id);
      const amount = int64(row.amount);
      const attempts = Number(row.attempt_count) + 1;
      const paid = amount === 0n || (await debitWallet(tx, userId, amount, Number(row.id), now)) !== null;
      if (paid) {
        await updateRecord(
          tx,
          row,
          `status = 'PAID', paid_at = ?, updated_at = ?, attempt_count = ?, next_attempt_at = null, failure_reason = ''`,
          [now.getTime(), now.getTime(), attempts],
        );
        await reactivateIfSettled(tx, userId, now);
        return { outcome: 'CHARGED', userSuspended: false, retryAt: null };
      }
      if (mode === 'settle') return { outcome: 'SKIPPED', userSuspended: false, retryAt: null };
      if (row.status === 'FAILED') {
        await updateRecord(tx, row, 'attempt_count = ?, failure_reason = ?, updated_at = ?', [attempts, INSUFFICIENT_FUNDS, now.getTime()]);
        return { outcome: 'FAILED', userSuspended: false, retryAt: null };
      }
      const delay = nextAttemptDelayMs(deps, attempts);
      if (delay !== null) {
        const retryAt = new Date(now.getTime() + delay);
        await updateRecord(tx, row, 'attempt_count = ?, next_attempt_at = ?, failure_reason = ?, updated_at = ?', [
          attempts,
          retryAt.getTime(),
          INSUFFICIENT_FUNDS,
          now.getTime(),
        ]);
        return { outcome: 'RETRY_SCHEDULED', userSuspended: false, retryAt };
      }
      await updateRecord(tx, row, `status = 'FAILED', attempt_count = ?, next_attempt_at = null, failure_reason = ?, updated_at = ?`, [
        attempts,
        INSUFFICIENT_FUNDS,
        now.getTime(),
      ]);
      const suspended = await tx.execute<{ affectedRows: number }>(
        `update users set status = 'SUSPENDED', suspension_reason = ?, suspended_for_non_payment = ?, updated_at = ?
         where id = ? and status = 'ACTIVE'`,
        [`non-payment: billing record ${id} failed after ${attempts} attempts`, true, now.getTime(), userId],
        'run',
      );
      return { outcome: 'FAILED', userSuspended: suspended.affectedRows === 1, retryAt: null };
    });
  }

  /** One charge attempt, re-read and re-tried when another charger moved the record first. */
  async function charge(em: EntityManager, id: number, mode: ChargeMode) {
    for (let round = 0; ; round++) {
      try {
        const result = await attempt(em, id, mode);
        if (result.retryAt) deps.onRetryScheduled?.(result.retryAt);
        if (result.outcome !== 'SKIPPED') log.info({ billingRecordId: id, mode, outcome: result.outcome }, 'charge attempt');
        return result;
      } catch (err) {
        // StaleRecord, or the unique debit index refusing a second debit for the record.
        if ((err instanceof StaleRecord || isUniqueViolation(err)) && round < 10) continue;
        throw err;
      }
    }
  }

  async function chargeAndView(em: EntityManager, id: number, mode: ChargeMode): Promise<ChargeResult> {
    const result = await charge(em, id, mode);
    const v = await view(em, id);
    const outcome: ChargeOutcome = result.outcome === 'SKIPPED' ? outcomeOf(v.record.status) : result.outcome;
    return { ...v, outcome, userSuspended: result.userSuspended };
  }

  async function chargeMany(em: EntityManager, ids: readonly number[], mode: ChargeMode): Promise<RetryCounts> {
    const counts = emptyRetryCounts();
    for (const id of ids) tally(counts, await charge(em, id, mode));
    return counts;
  }

  return {
    async createManualRecord(em, input) {
      if (input.amount <= 0n) throw invalidArgument('amount', 'NON_POSITIVE_AMOUNT', 'amount must be greater than zero');
      const description = input.description.trim();
      if (description === '') throw invalidArgument('description', 'MISSING_DESCRIPTION', 'description is required');
      if (description.length > MAX_DESCRIPTION) {
        throw invalidArgument('description', 'INVALID_DESCRIPTION', `description must be at most ${MAX_DESCRIPTION} characters`);
      }
      const requestId = checkRequestId(input.requestId);
      const hash = requestHash({ userId: input.userId, amount: input.amount, description });
      const { id, replayed } = await em.transactional(async (tx) => {
        if (requestId) {
          const existing = await findIdempotent(tx, 'CreateBillingRecord', requestId, hash);
          if (existing !== null) return { id: existing, replayed: true };
        }
        await getLiveUser(tx, input.userId);
        const now = clock.now();
        // Due at once: if the process dies before the first attempt, the retry scheduler makes it.
        const rows = await tx.execute<{ id: number | string }[]>(
          `insert into billing_records (user_id, kind, amount, status, description, attempt_count, next_attempt_at, failure_reason, created_at, updated_at)
           values (?, 'MANUAL', cast(? as bigint), 'PENDING', ?, 0, ?, '', ?, ?) returning id`,
          [input.userId, input.amount.toString(), description, now.getTime(), now.getTime(), now.getTime()],
          'all',
        );
        const recordId = Number(rows[0].id);
        if (requestId) await saveIdempotent(tx, 'CreateBillingRecord', requestId, hash, recordId, now);
        return { id: recordId, replayed: false };
      });
      if (replayed) {
        const v = await view(em, id);
        return { ...v, outcome: outcomeOf(v.record.status), userSuspended: false };
      }
      return chargeAndView(em, id, 'new');
    },

    getRecord: (em, id) => view(em, id),

    async listRecords(em, filter, pageReq) {
      const page = readPage(pageReq, filter);
      const records = await em.find(
        BillingRecord,
        {
          id: { $gt: page.afterId },
          ...(filter.userId !== null ? { userId: filter.userId } : {}),
          ...(filter.status !== null ? { status: filter.status } : {}),
        },
        { orderBy: { id: 'asc' }, limit: page.limit },
      );
      const { items, nextPageToken } = pageOf(records, page);
      const lines = items.length
        ? await em.find(LineItem, { billingRecordId: { $in: items.map((r) => r.id) } }, { orderBy: { id: 'asc' } })
        : [];
      const byRecord = new Map<number, LineItem[]>();
      for (const line of lines) {
        const list = byRecord.get(line.billingRecordId) ?? [];
        list.push(line);
        byRecord.set(line.billingRecordId, list);
      }
      return { items: items.map((record) => ({ record, lineItems: byRecord.get(record.id) ?? [] })), nextPageToken };
    },

    processRecord: (em, id) => chargeAndView(em, id, 'manual'),

    async listUsageLogs(em, filter, pageReq) {
      const page = readPage(pageReq, filter);
      const rows = await em.find(
        UsageLog,
        {
          id: { $gt: page.afterId },
          ...(filter.userId !== null ? { userId: filter.userId } : {}),
          ...(filter.status !== null ? { status: filter.status } : {}),
        },
        { orderBy: { id: 'asc' }, limit: page.limit },
      );
      return pageOf(rows, page);
    },

    async settleUser(em, userId) {
      const rows = await em.execute<{ id: number | string }[]>(
        `select id from billing_records where user_id = ? and status <> 'PAID' order by id`,
        [userId],
      );
      const counts = await chargeMany(
        em,
        rows.map((r) => Number(r.id)),
        'settle',
      );
      // A user suspended for non-payment with nothing unpaid (e.g. settled elsewhere) is reactivated too.
      await em.transactional((tx) => reactivateIfSettled(tx, userId, clock.now()));
      return counts;
    },

    chargeNewRecords: (em, ids) => chargeMany(em, ids, 'new'),

    async processDueRetries(em) {
      const counts = emptyRetryCounts();
      const seen = new Set<number>();
      for (;;) {
        const now = clock.now().getTime();
        const due = await em.execute<{ id: number | string }[]>(
          `select id from billing_records where status = 'PENDING' and next_attempt_at <= ? order by next_attempt_at, id limit 500`,
          [now],
        );
        const ids = due.map((r) => Number(r.id)).filter((id) => !seen.has(id));
        if (ids.length === 0) return counts;
        for (const id of ids) {
          seen.add(id);
          tally(counts, await charge(em, id, 'retry'));
        }
      }
    },

    async nextDueTime(em) {
      const rows = await em.execute<{ at: number | string | null }[]>(
        `select min(next_attempt_at) as at from billing_records where status = 'PENDING'`,
      );
      const at = rows[0]?.at;
      return at === null || at === undefined ? null : epochMs(at);
    },
  };
}

function outcomeOf(status: BillingRecordStatus): ChargeOutcome {
  return status === 'PAID' ? 'CHARGED' : status === 'FAILED' ? 'FAILED' : 'RETRY_SCHEDULED';
}
