/**
 * The money invariants, checked against the database itself. Every rule is a
 * query that returns the rows breaking it, in SQL that SQLite and PostgreSQL
 * both run; 64-bit values are read through `cast(x as text)`. The checker only
 * reads: on PostgreSQL it runs in one read-only REPEATABLE READ transaction, on
 * SQLite in one read transaction (a WAL snapshot), so a live service may keep
 * writing while it runs.
 *
 * Used by `npm run check-invariants` (src/ops/check-invariants.ts), the test
 * suite and the soak run.
 */
import { IsolationLevel, TableNotFoundException } from '@mikro-orm/core';
import type { EntityManager } from '@mikro-orm/knex';
import type { Database } from '../db/database';
import { migrationsList } from '../db/migrations';
import { formatMoney } from '../shared/money';

export type InvariantRule =
  | 'balance_matches_ledger'
  | 'no_negative_balance'
  | 'ledger_chain'
  | 'one_debit_per_record'
  | 'paid_record_debited_once'
  | 'debit_for_paid_record'
  | 'usage_linked_to_record'
  | 'usage_record_total'
  | 'usage_matches_line_items'
  | 'deleted_user_settled'
  | 'staging_record_of_open_run'
  | 'pending_totals_match'
  | 'ledger_row_has_event'
  | 'billing_record_events'
  | 'user_events'
  | 'job_run_finished_event'
  | 'events_after_retention';

/** Every rule with what it guarantees, in the order they are checked. */
export const INVARIANT_RULES: Readonly<Record<InvariantRule, string>> = Object.freeze({
  balance_matches_ledger: "every wallet's balance equals its ledger (credits - debits); no ledger row without a wallet",
  no_negative_balance: 'no wallet balance and no ledger balance_after is below zero',
  ledger_chain: "in each wallet's ledger, in id order, balance_after = previous balance_after +/- amount (from 0)",
  one_debit_per_record: 'no billing record is debited more than once',
  paid_record_debited_once: 'every PAID record with amount > 0 has exactly one DEBIT, of the same amount and user',
  debit_for_paid_record: 'every DEBIT belongs to an existing PAID record of the same user and amount',
  usage_linked_to_record:
    'a usage entry has a billing record iff it is BILLED, and a BILLED entry points at a USAGE record of its own user',
  usage_record_total: "every USAGE record has line items and its amount equals their sum",
  usage_matches_line_items: "each USAGE record's line items are exactly the quantities of the BILLED entries it links, per service",
  deleted_user_settled: "a deleted user's wallet is closed and holds no money, and none of their billing records is unpaid",
  pending_totals_match:
    "each user's pending totals (which the available balance subtracts) are exactly the PENDING usage of that live user, per service",
  staging_record_of_open_run:
    'a staging usage record (not yet sealed, not chargeable) belongs to an ingestion run still storing its rows or sealing its records (after a crash, the next run rolls back the first and finishes the second), is PENDING and unattempted, and owes nothing (amount 0; its line items are written before it is sealed)',
  ledger_row_has_event:
    'every ledger row has exactly one wallet.credited (CREDIT) or wallet.debited (DEBIT) event of its user with ref_id = its id, and every such event has its row (rows older than the retention mark may have lost theirs)',
  billing_record_events:
    'every billing record (not staging) has exactly one billing_record.created event, every PAID record exactly one billing_record.paid, every FAILED record a billing_record.failed, all of its user; no such event names a missing, staging or (paid) unpaid record (changes older than the retention mark excepted)',
  user_events:
    'every user has exactly one user.created event and every deleted user one user.deleted event, and no such event names a user that does not exist or is not deleted (changes older than the retention mark excepted)',
  job_run_finished_event:
    'every ended job run has exactly one job_run.finished event with its status, and no such event names a run still RUNNING or missing (runs ended before the retention mark excepted)',
  events_after_retention: 'no event is left at or below the id the retention says it deleted through',
});

export interface InvariantViolation {
  rule: InvariantRule;
  detail: string;
}

export interface InvariantCounts {
  users: number;
  deletedUsers: number;
  wallets: number;
  /** Sum of all wallet balances, in micros. */
  totalBalance: bigint;
  credits: number;
  debits: number;
  /** Sums of the CREDIT and DEBIT ledger rows, in micros. */
  creditTotal: bigint;
  debitTotal: bigint;
  billingRecords: Record<'PENDING' | 'PAID' | 'FAILED', number>;
  lineItems: number;
  usageLogs: Record<'PENDING' | 'BILLED' | 'REJECTED', number>;
}

export interface InvariantReport {
  ok: boolean;
  violations: InvariantViolation[];
  counts: InvariantCounts;
}

export interface CheckOptions {
  /** Most offending rows reported per query (default 50); a rule with more says so. */
  maxPerRule?: number;
  /**
   * Check inside this transaction's unit of work (seeing its uncommitted
   * changes) instead of a read snapshot of the checker's own.
   */
  within?: EntityManager;
}

type Row = Record<string, unknown>;

const str = (v: unknown): string => (v === null || v === undefined ? 'null' : String(v));
/** A micros value read as text, shown as money with its micros: "12.50 (12500000)". */
const m = (v: unknown): string =>
  v === null || v === undefined ? 'null' : `${formatMoney(BigInt(v as string | bigint))} (${String(v)} micros)`;

interface Query {
  rule: InvariantRule;
  /** Must end with `limit ?`; the limit is bound last. */
  sql: string;
  params?: unknown[];
  describe(row: Row): string;
}

const SIGNED_AMOUNT = `case when t.type = 'CREDIT' then t.amount else -t.amount end`;

/**
 * Sums that cannot overflow. SQLite's sum() of integers fails with "integer
 * overflow" past 2^63 - 1, and a checker that fails cannot report the
 * corruption that made it fail. So a 64-bit column is summed in two parts,
 * value / 2^32 and value % 2^32 (each row's parts are below 2^32, so their
 * sums fit for up to 2^31 rows), and the exact total is hi x 2^32 + lo.
 */
const SPLIT = '4294967296';
/** `<alias>_hi` and `<alias>_lo` columns (as text) of the overflow-safe sum of `expr`. */
const splitSum = (expr: string, alias: string): string =>
  `cast(coalesce(sum((${expr}) / ${SPLIT}), 0) as text) as ${alias}_hi, cast(coalesce(sum((${expr}) % ${SPLIT}), 0) as text) as ${alias}_lo`;
/** The raw sums (not cast), for a sub-select that is compared with equalsSplit. */
const splitSumRaw = (expr: string, alias: string): string =>
  `sum((${expr}) / ${SPLIT}) as ${alias}_hi, sum((${expr}) % ${SPLIT}) as ${alias}_lo`;
/**
 * SQL: `value` equals hi x 2^32 + lo, decided without computing that product:
 * the difference of the low parts must be a whole number of 2^32, which the
 * difference of the high parts must cancel.
 */
const equalsSplit = (value: string, hi: string, lo: string): string =>
  `(((${value}) % ${SPLIT} - ${lo}) % ${SPLIT} = 0 and (${value}) / ${SPLIT} - ${hi} + ((${value}) % ${SPLIT} - ${lo}) / ${SPLIT} = 0)`;
/** SQL: hi1 x 2^32 + lo1 equals hi2 x 2^32 + lo2 (both split sums), decided without the products. */
const equalsSplit2 = (hi1: string, lo1: string, hi2: string, lo2: string): string =>
  `(((${lo1}) - (${lo2})) % ${SPLIT} = 0 and (${hi1}) - (${hi2}) + ((${lo1}) - (${lo2})) / ${SPLIT} = 0)`;
/** The exact total of a split sum read back as text. */
const joinSplit = (hi: unknown, lo: unknown): bigint => BigInt((hi as string) ?? '0') * 4294967296n + BigInt((lo as string) ?? '0');

const QUERIES: readonly Query[] = [
  {
    rule: 'balance_matches_ledger',
    sql: `select w.user_id, cast(w.balance as text) as balance,
                 cast(coalesce(l.net_hi, 0) as text) as net_hi, cast(coalesce(l.net_lo, 0) as text) as net_lo
          from wallets w
          left join (select t.user_id, ${splitSumRaw(SIGNED_AMOUNT, 'net')} from wallet_transactions t group by t.user_id) l
            on l.user_id = w.user_id
          where not ${equalsSplit('w.balance', 'coalesce(l.net_hi, 0)', 'coalesce(l.net_lo, 0)')}
          order by w.user_id limit ?`,
    describe: (r) =>
      `wallet of user ${str(r.user_id)}: balance ${m(r.balance)}, but its ledger sums to ${m(joinSplit(r.net_hi, r.net_lo))}`,
  },
  {
    rule: 'balance_matches_ledger',
    sql: `select t.user_id, count(*) as n, ${splitSum(SIGNED_AMOUNT, 'net')}
          from wallet_transactions t
          where not exists (select 1 from wallets w where w.user_id = t.user_id)
          group by t.user_id order by t.user_id limit ?`,
    describe: (r) => `user ${str(r.user_id)} has ${str(r.n)} ledger rows (net ${m(joinSplit(r.net_hi, r.net_lo))}) but no wallet`,
  },
  {
    rule: 'no_negative_balance',
    sql: `select w.user_id, cast(w.balance as text) as balance from wallets w where w.balance < 0 order by w.user_id limit ?`,
    describe: (r) => `wallet of user ${str(r.user_id)} has a negative balance ${m(r.balance)}`,
  },
  {
    rule: 'no_negative_balance',
    sql: `select t.id, t.user_id, cast(t.balance_after as text) as balance_after
          from wallet_transactions t where t.balance_after < 0 order by t.id limit ?`,
    describe: (r) => `ledger row ${str(r.id)} of user ${str(r.user_id)} leaves a negative balance ${m(r.balance_after)}`,
  },
  {
    rule: 'ledger_chain',
    sql: `select x.id, x.user_id, x.type, cast(x.amount as text) as amount, cast(x.balance_after as text) as balance_after,
                 cast(x.prev as text) as prev
          from (select t.id, t.user_id, t.type, t.amount, t.balance_after,
                       coalesce(lag(t.balance_after) over (partition by t.user_id order by t.id), 0) as prev
                from wallet_transactions t) x
          where x.balance_after <> x.prev + case when x.type = 'CREDIT' then x.amount else -x.amount end
          order by x.user_id, x.id limit ?`,
    describe: (r) =>
      `ledger row ${str(r.id)} of user ${str(r.user_id)}: ${str(r.type)} of ${m(r.amount)} after a balance of ${m(r.prev)} ` +
      `says balance_after ${m(r.balance_after)}`,
  },
  {
    rule: 'one_debit_per_record',
    sql: `select t.billing_record_id, count(*) as n, ${splitSum('t.amount', 'total')}
          from wallet_transactions t where t.type = 'DEBIT'
          group by t.billing_record_id having count(*) > 1
          order by t.billing_record_id limit ?`,
    describe: (r) =>
      `billing record ${str(r.billing_record_id)} was debited ${str(r.n)} times (together ${m(joinSplit(r.total_hi, r.total_lo))})`,
  },
  {
    rule: 'paid_record_debited_once',
    sql: `select r.id, r.user_id, cast(r.amount as text) as amount, count(t.id) as debits,
                 sum(case when t.amount = r.amount and t.user_id = r.user_id then 1 else 0 end) as matching
          from billing_records r
          left join wallet_transactions t on t.billing_record_id = r.id and t.type = 'DEBIT'
          where r.status = 'PAID' and r.amount > 0
          group by r.id, r.user_id, r.amount
          having count(t.id) <> 1 or sum(case when t.amount = r.amount and t.user_id = r.user_id then 1 else 0 end) <> 1
          order by r.id limit ?`,
    describe: (r) =>
      `PAID billing record ${str(r.id)} of user ${str(r.user_id)} for ${m(r.amount)} has ${str(r.debits)} DEBIT rows, ` +
      `${str(r.matching ?? 0)} of them for that amount and user (expected exactly 1)`,
  },
  {
    rule: 'debit_for_paid_record',
    sql: `select t.id, t.user_id, t.billing_record_id, cast(t.amount as text) as amount,
                 r.id as record_id, r.status, r.user_id as record_user_id, cast(r.amount as text) as record_amount
          from wallet_transactions t
          left join billing_records r on r.id = t.billing_record_id
          where t.type = 'DEBIT'
            and (r.id is null or r.status <> 'PAID' or r.user_id <> t.user_id or r.amount <> t.amount)
          order by t.id limit ?`,
    describe: (r) =>
      r.record_id === null || r.record_id === undefined
        ? `DEBIT ${str(r.id)} of user ${str(r.user_id)} for ${m(r.amount)} names billing record ${str(r.billing_record_id)}, which does not exist`
        : `DEBIT ${str(r.id)} of user ${str(r.user_id)} for ${m(r.amount)} belongs to billing record ${str(r.billing_record_id)}, ` +
          `which is ${str(r.status)}, of user ${str(r.record_user_id)}, for ${m(r.record_amount)}`,
  },
  {
    rule: 'usage_linked_to_record',
    sql: `select l.id, l.status, l.user_id, l.billing_record_id, r.id as record_id, r.user_id as record_user_id, r.kind
          from usage_logs l
          left join billing_records r on r.id = l.billing_record_id
          where (l.status = 'BILLED'
                 and (l.billing_record_id is null or r.id is null or l.user_id is null
                      or r.user_id <> l.user_id or r.kind <> 'USAGE'))
             or (l.status <> 'BILLED' and l.billing_record_id is not null)
          order by l.id limit ?`,
    describe: (r) => {
      const entry = `usage entry ${str(r.id)} (${str(r.status)}, user ${str(r.user_id)})`;
      if (r.status !== 'BILLED') return `${entry} is not BILLED but points at billing record ${str(r.billing_record_id)}`;
      if (r.billing_record_id === null || r.billing_record_id === undefined) return `${entry} is BILLED without a billing record`;
      if (r.record_id === null || r.record_id === undefined) {
        return `${entry} points at billing record ${str(r.billing_record_id)}, which does not exist`;
      }
      return `${entry} points at billing record ${str(r.billing_record_id)}, a ${str(r.kind)} record of user ${str(r.record_user_id)}`;
    },
  },
  {
    rule: 'usage_record_total',
    sql: `select r.id, r.user_id, cast(r.amount as text) as amount, count(li.id) as lines, ${splitSum('li.amount', 'line_total')}
          from billing_records r
          left join line_items li on li.billing_record_id = r.id
          where r.kind = 'USAGE' and not r.staging
          group by r.id, r.user_id, r.amount
          having count(li.id) = 0
              or not ${equalsSplit('r.amount', `coalesce(sum(li.amount / ${SPLIT}), 0)`, `coalesce(sum(li.amount % ${SPLIT}), 0)`)}
          order by r.id limit ?`,
    describe: (r) =>
      Number(r.lines) === 0
        ? `USAGE billing record ${str(r.id)} of user ${str(r.user_id)} for ${m(r.amount)} has no line items`
        : `USAGE billing record ${str(r.id)} of user ${str(r.user_id)}: amount ${m(r.amount)}, but its ${str(r.lines)} line items sum to ${m(joinSplit(r.line_total_hi, r.line_total_lo))}`,
  },
  {
    rule: 'usage_matches_line_items',
    sql: `select li.billing_record_id, li.service, cast(li.quantity as text) as quantity,
                 cast(coalesce(u.q_hi, 0) as text) as q_hi, cast(coalesce(u.q_lo, 0) as text) as q_lo
          from line_items li
          join billing_records r on r.id = li.billing_record_id and r.kind = 'USAGE' and not r.staging
          left join (select l.billing_record_id, l.service, ${splitSumRaw('l.quantity', 'q')}
                     from usage_logs l where l.status = 'BILLED' group by l.billing_record_id, l.service) u
            on u.billing_record_id = li.billing_record_id and u.service = li.service
          where not ${equalsSplit('li.quantity', 'coalesce(u.q_hi, 0)', 'coalesce(u.q_lo, 0)')}
          order by li.billing_record_id, li.service limit ?`,
    describe: (r) =>
      `billing record ${str(r.billing_record_id)}: the ${JSON.stringify(r.service)} line item bills a quantity of ` +
      `${str(r.quantity)} (x10^-6), but the BILLED entries it links add up to ${joinSplit(r.q_hi, r.q_lo)}`,
  },
  {
    rule: 'usage_matches_line_items',
    sql: `select l.billing_record_id, l.service, count(*) as n, ${splitSum('l.quantity', 'quantity')}
          from usage_logs l
          where l.status = 'BILLED' and l.billing_record_id is not null
            and not exists (select 1 from line_items li where li.billing_record_id = l.billing_record_id and li.service = l.service)
            and not exists (select 1 from billing_records r where r.id = l.billing_record_id and r.staging)
          group by l.billing_record_id, l.service
          order by l.billing_record_id, l.service limit ?`,
    describe: (r) =>
      `billing record ${str(r.billing_record_id)} links ${str(r.n)} BILLED ${JSON.stringify(r.service)} entries ` +
      `(quantity ${joinSplit(r.quantity_hi, r.quantity_lo)} x10^-6) but has no line item for that service`,
  },
  {
    rule: 'pending_totals_match',
    sql: `select coalesce(t.user_id, u.user_id) as user_id, coalesce(t.service, u.service) as service,
                 cast(coalesce(t.quantity_hi, 0) as text) as t_hi, cast(coalesce(t.quantity_lo, 0) as text) as t_lo, coalesce(t.entries, 0) as t_n,
                 cast(coalesce(u.q_hi, 0) as text) as u_hi, cast(coalesce(u.q_lo, 0) as text) as u_lo, coalesce(u.n, 0) as u_n
          from usage_pending_totals t
          full outer join (select l.user_id, l.service, ${splitSumRaw('l.quantity', 'q')}, count(*) as n
                           from usage_logs l
                           where l.status = 'PENDING' and exists (select 1 from wallets w where w.user_id = l.user_id and w.closed_at is null)
                           group by l.user_id, l.service) u
            on u.user_id = t.user_id and u.service = t.service
          where coalesce(t.entries, 0) <> coalesce(u.n, 0)
             or not ${equalsSplit2('coalesce(t.quantity_hi, 0)', 'coalesce(t.quantity_lo, 0)', 'coalesce(u.q_hi, 0)', 'coalesce(u.q_lo, 0)')}
          order by 1, 2 limit ?`,
    describe: (r) =>
      `user ${str(r.user_id)}, ${JSON.stringify(r.service)}: the pending totals say ${str(r.t_n)} entries, quantity ` +
      `${joinSplit(r.t_hi, r.t_lo)} (x10^-6), but the PENDING usage is ${str(r.u_n)} entries, quantity ${joinSplit(r.u_hi, r.u_lo)}`,
  },
  {
    rule: 'staging_record_of_open_run',
    sql: `select r.id, r.job_run_id, r.status, r.attempt_count, cast(r.amount as text) as amount, u.state
          from billing_records r left join usage_runs u on u.job_run_id = r.job_run_id
          where r.staging and (u.state is null or u.state not in ('STAGING', 'SEALING') or r.status <> 'PENDING' or r.attempt_count <> 0 or r.amount <> 0)
          order by r.id limit ?`,
    describe: (r) =>
      `staging billing record ${str(r.id)} of job run ${str(r.job_run_id)} (run ${r.state === null || r.state === undefined ? 'unknown' : str(r.state)}, ` +
      `${str(r.status)}, ${str(r.attempt_count)} attempts, amount ${m(r.amount)}) should not exist: only a run still storing its rows has staging ` +
      `records (until it has sealed them all), unpaid, never attempted and owing nothing until sealed`,
  },
  {
    rule: 'deleted_user_settled',
    sql: `select w.user_id, cast(w.balance as text) as balance, w.closed_at
          from wallets w join users u on u.id = w.user_id
          where u.deleted_at is not null and (w.balance <> 0 or w.closed_at is null)
          order by w.user_id limit ?`,
    describe: (r) =>
      r.closed_at === null || r.closed_at === undefined
        ? `deleted user ${str(r.user_id)} has an open wallet holding ${m(r.balance)}`
        : `deleted user ${str(r.user_id)} has ${m(r.balance)} in their closed wallet, which no one can spend or see`,
  },
  {
    rule: 'deleted_user_settled',
    sql: `select r.id, r.user_id, r.status, cast(r.amount as text) as amount
          from billing_records r join users u on u.id = r.user_id
          where u.deleted_at is not null and r.status <> 'PAID'
          order by r.id limit ?`,
    describe: (r) => `billing record ${str(r.id)} (${str(r.status)}, ${m(r.amount)}) belongs to deleted user ${str(r.user_id)}`,
  },
];

/** The retention mark: changes before it may have lost their events. */
const MARK = `(select er.pruned_before from event_retention er where er.id = 1)`;
/** The event type of a ledger row. */
const WALLET_EVENT = `case when t.type = 'CREDIT' then 'wallet.credited' else 'wallet.debited' end`;

/**
 * Rows of `a` missing from `b` (both select three columns; `a` names them id, user_id, type): EXCEPT, so
 * each side is read once and sorted (no index on events.ref_id is needed);
 * `b` is a sub-select of its own, so a UNION in it stays inside it.
 */
const missing = (a: string, b: string): string =>
  `select x.id, x.user_id, x.type from (${a} except select * from (${b}) y) x order by x.id limit ?`;
/** Events of `types` naming the same ref more than once. */
const repeated = (types: string[]): string =>
  `select e.ref_id as id, count(*) as n from events e where e.type in (${types.map((ty) => `'${ty}'`).join(', ')})
   group by e.ref_id having count(*) > 1 order by e.ref_id limit ?`;
const eventsOf = (type: string, where = ''): string =>
  `select e.ref_id as id, e.user_id, e.type from events e where e.type = '${type}'${where}`;

const EVENT_QUERIES: readonly Query[] = [
  {
    rule: 'ledger_row_has_event',
    sql: missing(
      `select t.id, t.user_id, ${WALLET_EVENT} as type from wallet_transactions t where t.created_at >= ${MARK}`,
      `select e.ref_id, e.user_id, e.type from events e where e.type in ('wallet.credited', 'wallet.debited')`,
    ),
    describe: (r) => `ledger row ${str(r.id)} of user ${str(r.user_id)} has no ${str(r.type)} event`,
  },
  {
    rule: 'ledger_row_has_event',
    sql: missing(
      `select e.ref_id as id, e.user_id, e.type from events e where e.type in ('wallet.credited', 'wallet.debited')`,
      `select t.id, t.user_id, ${WALLET_EVENT} from wallet_transactions t`,
    ),
    describe: (r) => `${str(r.type)} event of user ${str(r.user_id)} names ledger row ${str(r.id)}, which does not exist as such`,
  },
  {
    rule: 'ledger_row_has_event',
    sql: repeated(['wallet.credited', 'wallet.debited']),
    describe: (r) => `ledger row ${str(r.id)} has ${str(r.n)} wallet events (expected exactly 1)`,
  },
  {
    rule: 'billing_record_events',
    sql: missing(
      `select r.id, r.user_id, 'billing_record.created' as type from billing_records r where not r.staging and r.created_at >= ${MARK}`,
      eventsOf('billing_record.created'),
    ),
    describe: (r) => `billing record ${str(r.id)} of user ${str(r.user_id)} has no billing_record.created event`,
  },
  {
    rule: 'billing_record_events',
    sql: missing(
      `select r.id, r.user_id, 'billing_record.paid' as type from billing_records r where r.status = 'PAID' and r.paid_at >= ${MARK}`,
      eventsOf('billing_record.paid'),
    ),
    describe: (r) => `PAID billing record ${str(r.id)} of user ${str(r.user_id)} has no billing_record.paid event`,
  },
  {
    rule: 'billing_record_events',
    sql: missing(
      `select r.id, r.user_id, 'billing_record.failed' as type from billing_records r where r.status = 'FAILED' and r.updated_at >= ${MARK}`,
      eventsOf('billing_record.failed'),
    ),
    describe: (r) => `FAILED billing record ${str(r.id)} of user ${str(r.user_id)} has no billing_record.failed event`,
  },
  {
    rule: 'billing_record_events',
    sql: missing(
      `select e.ref_id as id, e.user_id, e.type from events e where e.type in ('billing_record.created', 'billing_record.paid', 'billing_record.retry_scheduled', 'billing_record.failed')`,
      `select r.id, r.user_id, ty.type from billing_records r
       cross join (select 'billing_record.created' as type union all select 'billing_record.retry_scheduled' union all select 'billing_record.failed') ty
       where not r.staging
       union all select r.id, r.user_id, 'billing_record.paid' from billing_records r where r.status = 'PAID'`,
    ),
    describe: (r) => `${str(r.type)} event of user ${str(r.user_id)} names billing record ${str(r.id)}, which is missing, staging, of another user or (paid) not PAID`,
  },
  {
    rule: 'billing_record_events',
    sql: repeated(['billing_record.created']),
    describe: (r) => `billing record ${str(r.id)} has ${str(r.n)} billing_record.created events (expected exactly 1)`,
  },
  {
    rule: 'billing_record_events',
    sql: repeated(['billing_record.paid']),
    describe: (r) => `billing record ${str(r.id)} has ${str(r.n)} billing_record.paid events (PAID is final: expected exactly 1)`,
  },
  {
    rule: 'user_events',
    sql: missing(`select u.id, u.id as user_id, 'user.created' as type from users u where u.created_at >= ${MARK}`, `select e.user_id, e.user_id, e.type from events e where e.type = 'user.created'`),
    describe: (r) => `user ${str(r.id)} has no user.created event`,
  },
  {
    rule: 'user_events',
    sql: missing(
      `select u.id, u.id as user_id, 'user.deleted' as type from users u where u.deleted_at is not null and u.deleted_at >= ${MARK}`,
      `select e.user_id, e.user_id, e.type from events e where e.type = 'user.deleted'`,
    ),
    describe: (r) => `deleted user ${str(r.id)} has no user.deleted event`,
  },
  {
    rule: 'user_events',
    sql: missing(
      `select e.user_id as id, e.user_id, e.type from events e where e.type in ('user.created', 'user.deleted')`,
      `select u.id, u.id, 'user.created' from users u union all select u.id, u.id, 'user.deleted' from users u where u.deleted_at is not null`,
    ),
    describe: (r) => `${str(r.type)} event names user ${str(r.id)}, who ${r.type === 'user.deleted' ? 'is not deleted' : 'does not exist'}`,
  },
  {
    rule: 'user_events',
    sql: `select e.user_id as id, e.type, count(*) as n from events e where e.type in ('user.created', 'user.deleted')
          group by e.user_id, e.type having count(*) > 1 order by e.user_id limit ?`,
    describe: (r) => `user ${str(r.id)} has ${str(r.n)} ${str(r.type)} events (expected exactly 1)`,
  },
  {
    rule: 'job_run_finished_event',
    sql: missing(
      `select j.id, j.status as user_id, 'job_run.finished' as type from job_runs j where j.status <> 'RUNNING' and j.ended_at >= ${MARK}`,
      `select e.ref_id, case when e.payload like '%"status":"SUCCEEDED"%' then 'SUCCEEDED' else 'FAILED' end, e.type from events e where e.type = 'job_run.finished'`,
    ),
    describe: (r) => `job run ${str(r.id)}, ended ${str(r.user_id)}, has no job_run.finished event saying so`,
  },
  {
    rule: 'job_run_finished_event',
    sql: missing(
      `select e.ref_id as id, 0 as user_id, e.type from events e where e.type = 'job_run.finished'`,
      `select j.id, 0, 'job_run.finished' from job_runs j where j.status <> 'RUNNING'`,
    ),
    describe: (r) => `job_run.finished event names job run ${str(r.id)}, which is missing or still RUNNING`,
  },
  {
    rule: 'job_run_finished_event',
    sql: repeated(['job_run.finished']),
    describe: (r) => `job run ${str(r.id)} has ${str(r.n)} job_run.finished events (a run ends once: expected exactly 1)`,
  },
  {
    rule: 'events_after_retention',
    sql: `select e.id, e.type from events e where e.id <= (select er.pruned_through from event_retention er where er.id = 1) order by e.id limit ?`,
    describe: (r) => `event ${str(r.id)} (${str(r.type)}) is still there, at or below the id the retention says it deleted through`,
  },
];

async function runQueries(em: EntityManager, maxPerRule: number): Promise<InvariantViolation[]> {
  const violations: InvariantViolation[] = [];
  for (const q of [...QUERIES, ...EVENT_QUERIES]) {
    const rows = await em.execute<Row[]>(q.sql, [...(q.params ?? []), maxPerRule + 1]);
    for (const row of rows.slice(0, maxPerRule)) violations.push({ rule: q.rule, detail: q.describe(row) });
    if (rows.length > maxPerRule) {
      violations.push({ rule: q.rule, detail: `... more rows break this rule (only the first ${maxPerRule} are listed)` });
    }
  }
  return violations;
}

async function readCounts(em: EntityManager): Promise<InvariantCounts> {
  const one = async (sql: string): Promise<Row> => (await em.execute<Row[]>(sql))[0];
  const byStatus = async <S extends string>(table: string, statuses: readonly S[]): Promise<Record<S, number>> => {
    const rows = await em.execute<{ status: string; n: unknown }[]>(`select status, count(*) as n from ${table} group by status`);
    const out = Object.fromEntries(statuses.map((s) => [s, 0])) as Record<S, number>;
    for (const r of rows) out[r.status as S] = Number(r.n);
    return out;
  };
  const users = await one(
    `select count(*) as n, sum(case when deleted_at is null then 0 else 1 end) as deleted from users`,
  );
  const wallets = await one(`select count(*) as n, ${splitSum('balance', 'total')} from wallets`);
  const ledger = await one(
    `select sum(case when type = 'CREDIT' then 1 else 0 end) as credits, sum(case when type = 'DEBIT' then 1 else 0 end) as debits,
            ${splitSum(`case when type = 'CREDIT' then amount else 0 end`, 'credit_total')},
            ${splitSum(`case when type = 'DEBIT' then amount else 0 end`, 'debit_total')}
     from wallet_transactions`,
  );
  const lines = await one(`select count(*) as n from line_items`);
  return {
    users: Number(users.n),
    deletedUsers: Number(users.deleted ?? 0),
    wallets: Number(wallets.n),
    totalBalance: joinSplit(wallets.total_hi, wallets.total_lo),
    credits: Number(ledger.credits ?? 0),
    debits: Number(ledger.debits ?? 0),
    creditTotal: joinSplit(ledger.credit_total_hi, ledger.credit_total_lo),
    debitTotal: joinSplit(ledger.debit_total_hi, ledger.debit_total_lo),
    billingRecords: await byStatus('billing_records', ['PENDING', 'PAID', 'FAILED'] as const),
    lineItems: Number(lines.n),
    usageLogs: await byStatus('usage_logs', ['PENDING', 'BILLED', 'REJECTED'] as const),
  };
}

/**
 * Checks every rule of INVARIANT_RULES and counts what the database holds, in
 * a read snapshot of its own (or inside `opts.within`).
 */
export async function checkInvariants(db: Pick<Database, 'fork' | 'dialect'>, opts: CheckOptions = {}): Promise<InvariantReport> {
  const maxPerRule = opts.maxPerRule ?? 50;
  const work = async (tx: EntityManager): Promise<InvariantReport> => {
    const violations = await runQueries(tx, maxPerRule);
    const counts = await readCounts(tx);
    return { ok: violations.length === 0, violations, counts };
  };
  if (opts.within) return work(opts.within);
  const fork = db.fork();
  if (db.dialect === 'postgresql') {
    return fork.transactional(work, { isolationLevel: IsolationLevel.REPEATABLE_READ, readOnly: true });
  }
  return fork.transactional(work);
}

/** The tables the checker reads. */
const TABLES = [
  'users',
  'wallets',
  'wallet_transactions',
  'billing_records',
  'line_items',
  'usage_logs',
  'usage_runs',
  'usage_pending_totals',
  'job_runs',
  'events',
  'event_retention',
] as const;

/** MikroORM's record of applied migrations. */
const MIGRATIONS_TABLE = 'mikro_orm_migrations';

/** The rows, or null when the table does not exist; any other failure (no connection, say) is thrown. */
async function readIfTable(em: EntityManager, sql: string): Promise<Row[] | null> {
  try {
    return await em.execute<Row[]>(sql);
  } catch (err) {
    const missing =
      err instanceof TableNotFoundException ||
      (err as { code?: unknown })?.code === '42P01' ||
      /no such table/.test(String((err as Error)?.message));
    if (missing) return null;
    throw err;
  }
}

/**
 * Says what is wrong with the schema for checking (null when nothing is):
 * no billing schema at all, or migrations this build knows that were never
 * applied. Throws when the database cannot be reached. Changes nothing; it
 * never migrates.
 */
export async function describeSchemaProblem(db: Pick<Database, 'fork'>): Promise<string | null> {
  const fork = db.fork();
  await fork.execute('select 1 as x'); // can we reach it at all?
  const applied = await readIfTable(fork, `select name from ${MIGRATIONS_TABLE}`);
  const missingTables: string[] = [];
  for (const table of TABLES) {
    if ((await readIfTable(fork, `select 1 as x from ${table} where 1 = 0`)) === null) missingTables.push(table);
  }
  if (applied === null && missingTables.length === TABLES.length) {
    return 'the billing schema is missing: this database has none of the service tables and no migrations table (is it the right database?)';
  }
  if (missingTables.length > 0) return `the billing schema is incomplete: missing tables ${missingTables.join(', ')}`;
  if (applied === null) return `the billing schema has no ${MIGRATIONS_TABLE} table, so its version is unknown`;
  const names = new Set(applied.map((r) => String(r.name).replace(/\.[jt]s$/, '')));
  const pending = migrationsList.map((mig) => mig.name).filter((name) => !names.has(name));
  if (pending.length > 0) {
    return `the database schema is behind this build (not applied: ${pending.join(', ')}); start the service against it once to migrate`;
  }
  return null;
}
