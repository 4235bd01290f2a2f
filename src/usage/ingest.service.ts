/**
 * Usage ingestion: the log file -> usage_logs -> one billing record per user
 * -> charges. The file is streamed in batches inside one transaction, so
 * memory stays flat, a malformed JSON array bills nothing, and a crash leaves
 * either the whole run or none of it. See identity.ts for the exactly-once rule.
 *
 * Each usage row is written once, in its final state: per batch the entries
 * are validated and given their identity, the identities already stored are
 * looked up (which also gives the occurrence numbers, see `keyed`), and the
 * new rows are inserted BILLED (with the id of their user's record of this
 * run), PENDING with the reason, or REJECTED. The records and their line items are written at the end from
 * the totals kept in memory. The inserts are multi-row prepared statements on
 * the transaction's own connection, and run while the next batch is parsed.
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Logger } from 'pino';
import type { BillingService } from '../billing/billing.types';
import { isPostgres } from '../db/platform';
import { rawSql, type RawSql } from '../db/raw';
import { int64 } from '../db/types';
import type { Clock } from '../shared/clock';
import { formatDecimal, INT64_MAX, lineAmount, QUANTITY_SCALE } from '../shared/money';
import { rejectedIdentity, usageIdentity, type IdentityKind } from './identity';
import { readUsageFile, UsageFileError, UsageSourceError, type RawEntry } from './parser';
import { validateEntry } from './validate';
import { emptyCounts, type JobCounts } from '../jobs/job-run.entity';

/** What a run counted, plus a reported, non-fatal problem (e.g. the file is missing). */
export interface IngestCounts extends JobCounts {
  notice: string;
}

export interface IngestService {
  /** Ingests the file and bills what is billable; throws when the file is unusable (nothing is written then). */
  ingest(em: EntityManager, jobRunId: number): Promise<IngestCounts>;
}

export interface IngestDeps {
  clock: Clock;
  log: Logger;
  pricing: ReadonlyMap<string, bigint>;
  logFilePath: string;
  /** Longest that opening the usage file or one read of it may take (USAGE_READ_TIMEOUT_MS). */
  readTimeoutMs: number;
  maxFutureSkewMs: number;
  billing: BillingService;
}

/** Entries per batch read from the file (and per identity look-up). */
const BATCH_ENTRIES = 500;
/** Rows per multi-row INSERT statement; smaller statements take the remainder. */
const INSERT_SIZES = [500, 100, 10, 1];
const PROBE_PLACEHOLDERS = Array.from({ length: BATCH_ENTRIES }, () => '?').join(', ');
const USAGE_COLUMNS = ['dedup_key', 'user_id', 'service', 'quantity', 'usage_at', 'status', 'reason', 'billing_record_id', 'job_run_id', 'ingested_at'];
const INSERT_SQL = new Map(
  INSERT_SIZES.map((size) => [
    size,
    `insert into usage_logs (${USAGE_COLUMNS.join(', ')}) values ${Array.from({ length: size }, () => `(${USAGE_COLUMNS.map(() => '?').join(', ')})`).join(', ')}`,
  ]),
);

export class UsageFileUnusable extends Error {
  override readonly name = 'UsageFileUnusable';
}

// ---------------------------------------------------------------------------
// Occurrence numbers
// ---------------------------------------------------------------------------

const KIND_TAG: Record<IdentityKind, number> = { e: 1, c: 2, r: 3 };
const WORDS = 5;
const MAX_COUNT = 2 ** 26 - 1;

/**
 * Occurrences of identities seen more than once (or already stored), in typed
 * arrays: 20 bytes a slot (the identity's 132 hash bits and its kind, and the
 * count), open addressing, grown at 70% load. A Map of strings would take
 * ~100 bytes an entry. A file read for the first time leaves it nearly empty;
 * a file read again fills it with one slot per entry.
 */
class OccurrenceTable {
  private slots: Uint32Array;
  private mask: number;
  private size = 0;
  private readonly key = new Uint32Array(WORDS);

  /** `expected`: how many entries the file probably holds (sized up front so a big file is not copied while growing). */
  constructor(expected = 0) {
    let capacity = 1 << 10;
    while (capacity * 0.7 < expected && capacity < 1 << 24) capacity *= 2;
    this.slots = new Uint32Array(capacity * WORDS);
    this.mask = capacity - 1;
  }

  /**
   * Counts one more occurrence of (kind, hash) and returns its number (1 for
   * the first). `hash` is the identity's base64url text (22 characters, 132
   * bits); an 'e' identity (a producer id) is hashed first.
   */
  next(kind: IdentityKind, hash: Buffer, extraBits: number): number {
    const key = this.key;
    key[0] = hash.readUInt32LE(0);
    key[1] = hash.readUInt32LE(4);
    key[2] = hash.readUInt32LE(8);
    key[3] = hash.readUInt32LE(12);
    const tag = (KIND_TAG[kind] << 4) | extraBits; // 6 bits
    const slots = this.slots;
    let i = key[0] & this.mask;
    for (;;) {
      const at = i * WORDS;
      const last = slots[at + 4];
      if (last === 0) {
        slots[at] = key[0];
        slots[at + 1] = key[1];
        slots[at + 2] = key[2];
        slots[at + 3] = key[3];
        slots[at + 4] = (1 << 6) | tag;
        if (++this.size > this.mask * 0.7) this.grow();
        return 1;
      }
      if ((last & 63) === tag && slots[at] === key[0] && slots[at + 1] === key[1] && slots[at + 2] === key[2] && slots[at + 3] === key[3]) {
        const count = (last >>> 6) + 1;
        if (count > MAX_COUNT) throw new Error(`more than ${MAX_COUNT} identical usage entries in one file`);
        slots[at + 4] = ((count << 6) | tag) >>> 0;
        return count;
      }
      i = (i + 1) & this.mask;
    }
  }

  private grow(): void {
    const old = this.slots;
    const capacity = (this.mask + 1) * 2;
    this.slots = new Uint32Array(capacity * WORDS);
    this.mask = capacity - 1;
    for (let at = 0; at < old.length; at += WORDS) {
      if (old[at + 4] === 0) continue;
      let i = old[at] & this.mask;
      while (this.slots[i * WORDS + 4] !== 0) i = (i + 1) & this.mask;
      this.slots.set(old.subarray(at, at + WORDS), i * WORDS);
    }
  }
}

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

/** The 132 bits of a 22-character base64url digest: 16 bytes and the last character's low 4 bits. */
function digestBits(text: string): { bytes: Buffer; extra: number } {
  return { bytes: Buffer.from(text, 'base64url'), extra: B64.indexOf(text[21]) & 15 };
}

// ---------------------------------------------------------------------------

type UserState = 'live' | 'deleted' | 'unknown';

/** One user's usage billed by this run: per service the total quantity, its priced amount and the entry count. */
type UserTotals = Map<string, { quantity: bigint; amount: bigint; n: number }>;

/**
 * Why a billable entry waits: billing it in this run would take its line's
 * quantity or amount, or its record's amount, past the largest 64-bit value
 * the database holds exactly. A later run bills it (with a record of its own).
 */
export const OVER_RECORD_LIMIT = 'OVER_RECORD_LIMIT';

interface Candidate {
  kind: IdentityKind;
  /** identity.ts's hash (or the producer id for kind 'e'). */
  identity: string;
  /** The dedup key, once the occurrence number is known. */
  key: string;
  /** null: rejected. */
  userId: number | null;
  service: string;
  quantity: string;
  usageAt: number | null;
  reason: string;
  quantityScaled: bigint;
}

export function createIngestService(deps: IngestDeps): IngestService {
  const { clock, log, pricing } = deps;
  const pricedServices = [...pricing.keys()];

  /** SQL condition (on usage_logs `l`) and params: PENDING, live user, priced service. */
  function billable(): { sql: string; params: unknown[] } {
    if (pricedServices.length === 0) return { sql: '1 = 0', params: [] };
    return {
      sql: `l.status = 'PENDING' and l.service in (${pricedServices.map(() => '?').join(', ')})
            and exists (select 1 from users u where u.id = l.user_id and u.deleted_at is null)`,
      params: pricedServices,
    };
  }

  /** One run inside its transaction. */
  function createRun(tx: EntityManager, sql: RawSql, jobRunId: number, now: Date) {
    const pg = isPostgres(tx);
    let occurrences = new OccurrenceTable();
    const users = new Map<number, UserState>();
    /** user -> its record of this run, in the order records are allocated. */
    const recordOf = new Map<number, number>();
    const totals = new Map<number, UserTotals>();
    /** Each user's record amount so far: the sum of its lines' amounts. */
    const recordAmount = new Map<number, bigint>();
    /** PENDING usage of earlier runs that this run bills: user -> the ids of those entries. */
    const earlier = new Map<number, number[]>();
    let nextRecordId = 0;
    let accepted = 0;
    let rejected = 0;

    // The inserts run one after another on the connection while JavaScript reads the next batch.
    let tail: Promise<void> = Promise.resolve();
    let failure: unknown;
    const enqueue = (work: () => Promise<void>) => {
      tail = tail.then(work).catch((err: unknown) => {
        failure ??= err;
      });
    };
    const drain = async () => {
      await tail;
      if (failure) throw failure;
    };

    /**
     * Adds a billable entry to its user's line for the service, unless that
     * would take the line's quantity or amount, or the record's amount, past
     * INT64_MAX (then it changes nothing and returns false: the entry waits
     * with OVER_RECORD_LIMIT). Amounts are exact: the line is priced again
     * from its whole quantity, rounded once.
     */
    function add(userId: number, service: string, quantity: bigint): boolean {
      const line = totals.get(userId)?.get(service);
      const newQuantity = (line?.quantity ?? 0n) + quantity;
      if (newQuantity > INT64_MAX) return false;
      const newAmount = lineAmount(newQuantity, pricing.get(service)!);
      const newRecordAmount = (recordAmount.get(userId) ?? 0n) - (line?.amount ?? 0n) + newAmount;
      if (newAmount > INT64_MAX || newRecordAmount > INT64_MAX) return false;
      let t = totals.get(userId);
      if (!t) totals.set(userId, (t = new Map()));
      if (line) {
        line.quantity = newQuantity;
        line.amount = newAmount;
        line.n++;
      } else {
        t.set(service, { quantity: newQuantity, amount: newAmount, n: 1 });
      }
      recordAmount.set(userId, newRecordAmount);
      return true;
    }

    async function allocateRecords(userIds: number[]): Promise<void> {
      if (userIds.length === 0) return;
      let ids: number[];
      if (pg) {
        const rows = await tx.execute<{ id: number | string }[]>(
          `select nextval(pg_get_serial_sequence('billing_records', 'id')) as id from generate_series(1, ?)`,
          [userIds.length],
        );
        ids = rows.map((r) => Number(r.id));
      } else {
        // SQLite: this transaction is the only writer, so ids after the largest one ever used are ours.
        if (nextRecordId === 0) {
          const rows = await tx.execute<{ m: number | string | null; s: number | string | null }[]>(
            `select (select max(id) from billing_records) as m, (select seq from sqlite_sequence where name = 'billing_records') as s`,
          );
          nextRecordId = Math.max(Number(rows[0].m ?? 0), Number(rows[0].s ?? 0)) + 1;
        }
        ids = userIds.map(() => nextRecordId++);
      }
      userIds.forEach((u, i) => recordOf.set(u, ids[i]));
      // The record exists before its usage rows point at it (foreign key); finish() writes its amount and lines.
      const at = now.getTime();
      for (let i = 0; i < userIds.length; i += 500) {
        const part = userIds.slice(i, i + 500);
        await tx.execute(
          `insert into billing_records (id, user_id, kind, amount, status, description, attempt_count, next_attempt_at, failure_reason, job_run_id, created_at, updated_at)
           values ${part.map(() => `(?, ?, 'USAGE', 0, 'PENDING', '', 0, ?, '', ?, ?, ?)`).join(', ')}`,
          part.flatMap((userId) => [recordOf.get(userId), userId, at, jobRunId, at, at]),
          'run',
        );
      }
    }

    async function lookUpUsers(ids: number[]): Promise<void> {
      const unknown = [...new Set(ids)].filter((id) => !users.has(id));
      for (let i = 0; i < unknown.length; i += 500) {
        const part = unknown.slice(i, i + 500);
        // On PostgreSQL the open wallets are share-locked until the run commits, so none of these users can be
        // deleted while a record is being made for them (a delete closes the wallet row first).
        const rows = await tx.execute<{ id: number | string; deleted: number | boolean }[]>(
          `select u.id, (u.deleted_at is not null or w.closed_at is not null) as deleted
           from users u join wallets w on w.user_id = u.id
           where u.id in (${part.map(() => '?').join(', ')})${pg ? ' for share of w' : ''}`,
          part,
        );
        for (const id of part) users.set(id, 'unknown');
        for (const r of rows) users.set(Number(r.id), r.deleted === true || r.deleted === 1 ? 'deleted' : 'live');
      }
    }

    function candidate(entry: RawEntry): Candidate {
      const v = validateEntry(entry, now, deps.maxFutureSkewMs);
      if (v.ok) {
        const u = v.usage;
        const { kind, identity } = usageIdentity(u);
        return { kind, identity, key: '', userId: u.userId, service: u.service, quantity: u.quantity.toString(), usageAt: u.timestamp.getTime(), reason: '', quantityScaled: u.quantity };
      }
      const { kind, identity } = rejectedIdentity(entry.raw);
      return { kind, identity, key: '', userId: null, service: '', quantity: '0', usageAt: null, reason: v.reason, quantityScaled: 0n };
    }

    /** The stored keys among `keys` and the run that stored each (one prepared statement: the list is padded). */
    async function probe(keys: string[]): Promise<Map<string, number>> {
      const stored = new Map<string, number>();
      for (let i = 0; i < keys.length; i += BATCH_ENTRIES) {
        const part = keys.slice(i, i + BATCH_ENTRIES);
        while (part.length < BATCH_ENTRIES) part.push(part[0]);
        const rows = await sql.all<{ dedup_key: string; job_run_id: number | string | null }>(
          `select dedup_key, job_run_id from usage_logs where dedup_key in (${PROBE_PLACEHOLDERS})`,
          part,
          { reuse: true },
        );
        for (const r of rows) stored.set(r.dedup_key, Number(r.job_run_id));
      }
      return stored;
    }

    /**
     * Gives each candidate its key (identity.ts) and drops the ones already
     * stored. The occurrence number needs memory only for identities that were
     * seen before: an entry whose first key (`c:<hash>:1`) is not stored, and
     * that did not occur earlier in this batch, is the first occurrence in the
     * file (an earlier one would have stored or found that key). Other
     * occurrences are counted in `occurrences`, so n = (earlier occurrences
     * counted there) + 1, plus 1 more when this run stored the first one.
     */
    async function keyed(found: Candidate[]): Promise<Candidate[]> {
      const first = await probe(found.map((c) => (c.kind === 'e' ? `e:${c.identity}` : `${c.kind}:${c.identity}:1`)));
      /** identity -> did this run store its first occurrence (c:<hash>:1)? Per batch. */
      const seenHere = new Map<string, boolean>();
      const out: Candidate[] = [];
      const later: Candidate[] = [];
      for (const c of found) {
        const id = c.kind + c.identity;
        if (c.kind === 'e') {
          // A producer id stored before, or earlier in this batch, is the same usage.
          if (first.has(`e:${c.identity}`) || seenHere.has(id)) continue;
          seenHere.set(id, true);
          c.key = `e:${c.identity}`;
          out.push(c);
          continue;
        }
        let storedFirstHere = seenHere.get(id);
        if (storedFirstHere === undefined) {
          const run = first.get(`${c.kind}:${c.identity}:1`);
          if (run === undefined) {
            seenHere.set(id, true);
            c.key = `${c.kind}:${c.identity}:1`;
            out.push(c);
            continue;
          }
          storedFirstHere = run === jobRunId;
          seenHere.set(id, storedFirstHere);
        }
        const { bytes, extra } = digestBits(c.identity);
        const n = occurrences.next(c.kind, bytes, extra) + (storedFirstHere ? 1 : 0);
        c.key = `${c.kind}:${c.identity}:${n}`;
        if (n === 1) continue; // its first key is stored by an earlier run: a duplicate
        later.push(c);
      }
      if (later.length > 0) {
        const stored = await probe(later.map((c) => c.key));
        for (const c of later) if (!stored.has(c.key)) out.push(c);
      }
      if (later.length === 0) return out;
      // Back to file order (the ids of usage rows follow it).
      const keep = new Set(out);
      return found.filter((c) => keep.has(c));
    }

    /** Inserts `params` (USAGE_COLUMNS.length values a row, flat) with the fewest prepared statements. */
    async function insertRows(params: unknown[]): Promise<void> {
      const width = USAGE_COLUMNS.length;
      const rows = params.length / width;
      let at = 0;
      for (const size of INSERT_SIZES) {
        while (rows - at >= size) {
          const changed = await sql.run(INSERT_SQL.get(size)!, params.slice(at * width, (at + size) * width), { reuse: true });
          if (changed !== size) throw new Error('usage rows changed while ingesting; run aborted');
          at += size;
        }
      }
    }

    return {
      /** PENDING usage of earlier runs that is billable now joins this run's records. */
      async start(): Promise<void> {
        // Entry by entry, oldest first (no SQL sum: it could overflow), each within the record limit.
        const cond = billable();
        let afterId = 0;
        for (;;) {
          const rows = await tx.execute<{ id: number | string; user_id: number | string; service: string; quantity: string }[]>(
            `select l.id, l.user_id, l.service, cast(l.quantity as text) as quantity
             from usage_logs l where l.id > ? and ${cond.sql} order by l.id limit 5000`,
            [afterId, ...cond.params],
          );
          if (rows.length === 0) break;
          for (const r of rows) {
            const userId = Number(r.user_id);
            if (!add(userId, r.service, int64(r.quantity))) continue;
            let ids = earlier.get(userId);
            if (!ids) earlier.set(userId, (ids = []));
            ids.push(Number(r.id));
          }
          afterId = Number(rows[rows.length - 1].id);
        }
        await allocateRecords([...earlier.keys()]);
      },

      async batch(entries: RawEntry[]): Promise<void> {
        const found = entries.map(candidate);
        if (found.length === 0) return;
        // Everything queued so far is written; now ask which identities are stored already.
        await drain();
        const fresh = await keyed(found);
        await lookUpUsers(fresh.flatMap((c) => (c.userId === null ? [] : [c.userId])));
        // Decide each entry first (billed now, or why not), so that records are made only for users billed now.
        const reasons: string[] = [];
        const newUsers = new Set<number>();
        for (const c of fresh) {
          if (c.userId === null) {
            reasons.push(c.reason);
            continue;
          }
          const state = users.get(c.userId);
          if (state === 'unknown') reasons.push('UNKNOWN_USER');
          else if (state === 'deleted') reasons.push('USER_DELETED');
          else if (!pricing.has(c.service)) reasons.push('NO_PRICE');
          else if (!add(c.userId, c.service, c.quantityScaled)) reasons.push(OVER_RECORD_LIMIT);
          else {
            reasons.push('');
            if (!recordOf.has(c.userId)) newUsers.add(c.userId);
          }
        }
        await allocateRecords([...newUsers]);
        const at = now.getTime();
        const params: unknown[] = [];
        fresh.forEach((c, i) => {
          if (c.userId === null) {
            rejected++;
            params.push(c.key, null, '', '0', null, 'REJECTED', reasons[i], null, jobRunId, at);
            return;
          }
          accepted++;
          if (reasons[i] === '') {
            params.push(c.key, c.userId, c.service, c.quantity, c.usageAt, 'BILLED', '', recordOf.get(c.userId), jobRunId, at);
          } else {
            params.push(c.key, c.userId, c.service, c.quantity, c.usageAt, 'PENDING', reasons[i], null, jobRunId, at);
          }
        });
        enqueue(() => insertRows(params));
      },

      /** Writes the records and their lines, links earlier PENDING usage; returns the record ids. */
      async finish(): Promise<{ ids: number[]; accepted: number; rejected: number }> {
        await drain();
        // The file is read: the occurrence table (the largest allocation of a run) can go.
        occurrences = new OccurrenceTable(0);
        const records: unknown[][] = [];
        const lines: unknown[][] = [];
        const ids: number[] = [];
        for (const [userId, recordId] of recordOf) {
          const t = totals.get(userId)!;
          const priced = [...t.entries()]
            .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
            .map(([service, l]) => ({ service, quantity: l.quantity, unitPrice: pricing.get(service)!, amount: l.amount }));
          const total = recordAmount.get(userId)!;
          const description = `Usage: ${priced.map((l) => `${formatDecimal(l.quantity, QUANTITY_SCALE)} ${l.service}`).join(', ')} (job run ${jobRunId})`;
          records.push([recordId, total.toString(), description]);
          for (const l of priced) lines.push([recordId, l.service, l.quantity.toString(), l.unitPrice.toString(), l.amount.toString()]);
          ids.push(recordId);
        }
        for (let i = 0; i < records.length; i += 1000) {
          const part = records.slice(i, i + 1000);
          const res = await tx.execute<{ affectedRows: number }>(
            `update billing_records set amount = v.amount, description = v.description
             from (select column1 as id, column2 as amount, column3 as description
                   from (values ${part.map(() => '(cast(? as bigint), cast(? as bigint), ?)').join(', ')}) as t) as v
             where billing_records.id = v.id`,
            part.flat(),
            'run',
          );
          if (res.affectedRows !== part.length) throw new Error('billing records of this run changed while ingesting; run aborted');
        }
        for (let i = 0; i < lines.length; i += 1000) {
          const part = lines.slice(i, i + 1000);
          await tx.execute(
            `insert into line_items (billing_record_id, service, quantity, unit_price, amount)
             values ${part.map(() => '(?, ?, cast(? as bigint), cast(? as bigint), cast(? as bigint))').join(', ')}`,
            part.flat(),
            'run',
          );
        }
        for (const [userId, ids] of earlier) {
          for (let i = 0; i < ids.length; i += 500) {
            const part = ids.slice(i, i + 500);
            const linked = await tx.execute<{ affectedRows: number }>(
              `update usage_logs set status = 'BILLED', reason = '', billing_record_id = ?
               where user_id = ? and status = 'PENDING' and id in (${part.map(() => '?').join(', ')})`,
              [recordOf.get(userId), userId, ...part],
              'run',
            );
            // Another writer billed some of these entries first: undo the whole run rather than bill twice.
            if (linked.affectedRows !== part.length) throw new Error(`usage of user ${userId} changed while billing; run aborted`);
          }
        }
        return { ids: ids.sort((a, b) => a - b), accepted, rejected };
      },

      /** Stops the queued inserts from reporting (the transaction is rolling back). */
      async abandon(): Promise<void> {
        await tail;
      },
    };
  }

  /** Says why each entry of an earlier run that stays PENDING is not billed yet; returns how many are PENDING. */
  async function explainPending(tx: EntityManager, jobRunId: number): Promise<number> {
    const priced = pricedServices.length === 0 ? `''` : pricedServices.map(() => '?').join(', ');
    await tx.execute(
      `update usage_logs set reason = case
         when not exists (select 1 from users u where u.id = usage_logs.user_id) then 'UNKNOWN_USER'
         when exists (select 1 from users u where u.id = usage_logs.user_id and u.deleted_at is not null) then 'USER_DELETED'
         when usage_logs.service not in (${priced}) then 'NO_PRICE'
         else '${OVER_RECORD_LIMIT}' end
       where status = 'PENDING' and (job_run_id is null or job_run_id <> ?)`,
      [...pricedServices, jobRunId],
      'run',
    );
    const rows = await tx.execute<{ n: number | string }[]>(`select count(*) as n from usage_logs where status = 'PENDING'`);
    return Number(rows[0].n);
  }

  return {
    async ingest(rootEm, jobRunId) {
      const em = rootEm.fork();
      const counts: IngestCounts = { ...emptyCounts(), notice: '' };
      const unusable = (why: string) => new UsageFileUnusable(`usage log file ${deps.logFilePath} is unusable, nothing was billed: ${why}`);
      // Open the file, check it is a regular file and read its first batch before the write transaction starts:
      // a FIFO, a hung mount or a missing file never holds the database's writer.
      const batches = readUsageFile(deps.logFilePath, { batchSize: BATCH_ENTRIES, readTimeoutMs: deps.readTimeoutMs });
      let first: IteratorResult<RawEntry[], unknown>;
      try {
        first = await batches.next();
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
          log.warn({ path: deps.logFilePath }, 'usage log file not found; nothing to ingest');
          first = { done: true, value: undefined };
          counts.notice = `usage log file not found: ${deps.logFilePath} (no data)`;
        } else if (err instanceof UsageFileError || err instanceof UsageSourceError) {
          throw unusable(err.message);
        } else {
          throw err;
        }
      }
      let recordIds: number[];
      try {
        recordIds = await em.transactional(async (tx) => {
          // One ingestion at a time across replicas on PostgreSQL (SQLite has a single writer anyway).
          if (isPostgres(tx)) await tx.execute(`select pg_advisory_xact_lock(72010001)`);
          const now = clock.now();
          const sql = await rawSql(tx);
          const run = createRun(tx, sql, jobRunId, now);
          try {
            await run.start();
            try {
              for (let next = first; !next.done; next = await batches.next()) {
                counts.entriesRead += next.value.length;
                await run.batch(next.value);
              }
            } catch (err) {
              if (err instanceof UsageFileError || err instanceof UsageSourceError) throw unusable(err.message);
              throw err;
            }
            const done = await run.finish();
            counts.entriesAccepted = done.accepted;
            counts.entriesRejected = done.rejected;
            counts.entriesDuplicate = counts.entriesRead - done.accepted - done.rejected;
            counts.entriesPending = await explainPending(tx, jobRunId);
            return done.ids;
          } catch (err) {
            await run.abandon();
            throw err;
          } finally {
            await sql.close();
          }
        });
      } finally {
        await batches.return('empty'); // closes the file if the run stopped before its end (the value is unused)
      }
      counts.billingRecordsCreated = recordIds.length;
      const charged = await deps.billing.chargeNewRecords(em, recordIds);
      Object.assign(counts, {
        chargesSucceeded: charged.chargesSucceeded,
        retriesScheduled: charged.retriesScheduled,
        recordsFailed: charged.recordsFailed,
        usersSuspended: charged.usersSuspended,
      });
      return counts;
    },
  };
}
