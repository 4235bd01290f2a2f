/**
 * Users: create (with an empty wallet), read, list, profile changes,
 * suspension by hand, and deletion (which closes the wallet: see
 * ../wallets/ledger.repository.ts). Writes go through the users door
 * (./users.repository.ts) and the ledger's.
 */
import { readIn, type Database } from '../db/database';
import type { IdempotencyKeys } from '../db/idempotency';
import { isUniqueViolation } from '../db/errors';
import type { BillingRecordsRepository } from '../billing/records.repository';
import type { CallContext } from '../shared/context';
import type { Clock } from '../shared/clock';
import { alreadyExists, failedPrecondition, invalidArgument } from '../shared/errors';
import { readPage, type PageRequest } from '../shared/paging';
import type { UsageLogsRepository } from '../usage/usage-logs.repository';
import type { BalanceAlertsRepository } from '../wallets/balance-alerts.repository';
import type { LedgerRepository } from '../wallets/ledger.repository';
import { User, type UserStatus } from './user.entity';
import type { UsersRepository } from './users.repository';

const EMAIL_RE = /^[^\s@"(),:;<>[\\\]]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$/;
const MAX_NAME = 200;
const MAX_REASON = 500;

/** Emails are compared and stored trimmed and lower-cased. */
export function normalizeEmail(raw: string): string {
  const email = raw.trim().toLowerCase();
  if (email.length === 0) throw invalidArgument('email', 'MISSING_EMAIL', 'email is required');
  if (email.length > 254 || !EMAIL_RE.test(email) || email.split('@')[0].length > 64) {
    throw invalidArgument('email', 'INVALID_EMAIL', 'email is not a valid address');
  }
  return email;
}

function normalizeName(raw: string): string {
  const name = raw.trim();
  if (name.length === 0) throw invalidArgument('name', 'MISSING_NAME', 'name is required');
  if (name.length > MAX_NAME) throw invalidArgument('name', 'INVALID_NAME', `name must be at most ${MAX_NAME} characters`);
  return name;
}

export interface CreateUserInput {
  email: string;
  name: string;
  requestId: string;
}

export interface UsersService {
  create(ctx: CallContext, input: CreateUserInput): Promise<User>;
  get(ctx: CallContext, id: number): Promise<User>;
  list(ctx: CallContext, page: PageRequest, status: UserStatus | null): Promise<{ items: User[]; nextPageToken: string }>;
  update(ctx: CallContext, id: number, changes: { email?: string; name?: string }): Promise<User>;
  delete(ctx: CallContext, id: number): Promise<void>;
  suspend(ctx: CallContext, id: number, reason: string): Promise<User>;
  activate(ctx: CallContext, id: number): Promise<User>;
}

export interface UsersDeps {
  db: Database;
  clock: Clock;
  users: UsersRepository;
  ledger: LedgerRepository;
  records: BillingRecordsRepository;
  usageLogs: UsageLogsRepository;
  idempotency: IdempotencyKeys;
  pricing: ReadonlyMap<string, bigint>;
  /** The door of balance_alerts: a new user's row. */
  alerts: Pick<BalanceAlertsRepository, 'open'>;
}

export function createUsersService(deps: UsersDeps): UsersService {
  const { db, clock, users, ledger, records, usageLogs, idempotency, pricing } = deps;

  const emailTaken = (err: unknown): never => {
    if (isUniqueViolation(err)) throw alreadyExists('EMAIL_TAKEN', 'a user with this email already exists');
    throw err;
  };

  async function ensureEmailFree(ctx: { em: CallContext['em'] }, email: string, exceptId?: number): Promise<void> {
    const other = await users.liveIdByEmail(ctx.em, email);
    if (other !== null && other !== exceptId) throw alreadyExists('EMAIL_TAKEN', 'a user with this email already exists');
  }

  return {
    async create(ctx, input) {
      const email = normalizeEmail(input.email);
      const name = normalizeName(input.name);
      const key = idempotency.key('CreateUser', input.requestId, { email, name });
      return db
        .transaction(async (tx) => {
          if (key) {
            const existing = await idempotency.claim(tx, key);
            if (existing !== null) {
              // Replay the first response: the user as it was created.
              const user = await tx.em.findOneOrFail(User, existing);
              const first = new User(email, name, user.createdAt);
              first.id = user.id;
              return first;
            }
          }
          await ensureEmailFree(tx, email);
          const now = clock.now();
          const user = await users.create(tx, email, name, now);
          await ledger.open(tx, user.id, now);
          // Usage recorded for this id before it existed is now the user's unbilled usage. First wait for batches
          // recording usage for this id right now (PostgreSQL): they found the id unknown and will not count it.
          await db.lockUsers(tx, [user.id], 'exclusive');
          await usageLogs.countPendingOf(tx, user.id);
          // A new user has nothing to spend (0, less usage recorded for the id before): DEPLETED, and nothing crossed.
          await deps.alerts.open(tx, user.id, 'DEPLETED', now);
          if (key) await idempotency.complete(tx, key, user.id, now);
          return user;
        }, ctx)
        .catch(emailTaken);
    },

    get: (ctx, id) => users.getLive(ctx.em, id),

    list(ctx, pageReq, status) {
      return users.list(ctx.em, readPage(pageReq, { status }), status);
    },

    async update(ctx, id, changes) {
      const email = changes.email === undefined ? undefined : normalizeEmail(changes.email);
      const name = changes.name === undefined ? undefined : normalizeName(changes.name);
      return db
        .transaction(async (tx) => {
          const user = await users.getLive(tx.em, id);
          if (email !== undefined && email !== user.email) await ensureEmailFree(tx, email, id);
          await users.saveProfile(tx, user, { email: email === user.email ? undefined : email, name }, clock.now());
          return user;
        }, ctx)
        .catch(emailTaken);
    },

    async delete(ctx, id) {
      await db.transaction(async (tx) => {
        const user = await users.getLive(tx.em, id);
        const now = clock.now();
        // Close the wallet first, with a conditional UPDATE of its row: a credit or debit of the same wallet either
        // committed before (then the balance is not zero) or waits for this row (PostgreSQL; SQLite has one writer)
        // and then finds the wallet closed. Whichever commits first wins.
        if (!(await ledger.closeIfEmpty(tx, id, now))) {
          throw failedPrecondition('BALANCE_NOT_ZERO', `user ${id} still has a non-zero wallet balance`);
        }
        if (await records.hasUnpaid(tx, id)) {
          throw failedPrecondition('UNPAID_BILLING_RECORDS', `user ${id} has unpaid billing records`);
        }
        // Usage recorded and not billed yet would be billed by the next run: bill it first.
        const unbilled = [...(await usageLogs.pendingTotals(id, readIn(tx)))].filter(([service, q]) => q > 0n && pricing.has(service));
        if (unbilled.length > 0) {
          throw failedPrecondition('UNBILLED_USAGE', `user ${id} has usage not billed yet (${unbilled.map(([s]) => s).join(', ')}); run ProcessLogs first`);
        }
        await usageLogs.forgetPendingOf(tx, id);
        await users.markDeleted(tx, user, now);
      }, ctx);
    },

    async suspend(ctx, id, reason) {
      const why = reason.trim();
      if (why === '') throw invalidArgument('reason', 'MISSING_REASON', 'reason is required');
      if (why.length > MAX_REASON) throw invalidArgument('reason', 'INVALID_REASON', `reason must be at most ${MAX_REASON} characters`);
      return db.transaction(async (tx) => {
        const user = await users.getLive(tx.em, id);
        await users.suspend(tx, user, why, clock.now());
        return user;
      }, ctx);
    },

    async activate(ctx, id) {
      return db.transaction(async (tx) => {
        const user = await users.getLive(tx.em, id);
        await users.activate(tx, user, clock.now());
        return user;
      }, ctx);
    },
  };
}
