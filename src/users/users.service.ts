import type { EntityManager } from '@mikro-orm/knex';
import { checkRequestId, findIdempotent, requestHash, saveIdempotent } from '../db/idempotency';
import { isUniqueViolation } from '../db/errors';
import type { Clock } from '../shared/clock';
import { alreadyExists, failedPrecondition, invalidArgument, notFound } from '../shared/errors';
import { pageOf, readPage, type PageRequest } from '../shared/paging';
import { Wallet } from '../wallets/wallet.entity';
import { closeEmptyWallet } from '../wallets/wallets.service';
import { User, type UserStatus } from './user.entity';

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
  create(em: EntityManager, input: CreateUserInput): Promise<User>;
  get(em: EntityManager, id: number): Promise<User>;
  list(em: EntityManager, page: PageRequest, status: UserStatus | null): Promise<{ items: User[]; nextPageToken: string }>;
  update(em: EntityManager, id: number, changes: { email?: string; name?: string }): Promise<User>;
  delete(em: EntityManager, id: number): Promise<void>;
  suspend(em: EntityManager, id: number, reason: string): Promise<User>;
  activate(em: EntityManager, id: number): Promise<User>;
}

/** Loads a user that has not been deleted, or throws NOT_FOUND. */
export async function getLiveUser(em: EntityManager, id: number): Promise<User> {
  const user = await em.findOne(User, { id, deletedAt: null });
  if (!user) throw notFound('USER_NOT_FOUND', `user ${id} not found`);
  return user;
}

export function createUsersService(deps: { clock: Clock }): UsersService {
  const { clock } = deps;

  async function ensureEmailFree(em: EntityManager, email: string, exceptId?: number): Promise<void> {
    const other = await em.findOne(User, { email, deletedAt: null }, { fields: ['id'] });
    if (other && other.id !== exceptId) throw alreadyExists('EMAIL_TAKEN', 'a user with this email already exists');
  }

  const emailTaken = (err: unknown): never => {
    if (isUniqueViolation(err)) throw alreadyExists('EMAIL_TAKEN', 'a user with this email already exists');
    throw err;
  };

  return {
    async create(em, input) {
      const email = normalizeEmail(input.email);
      const name = normalizeName(input.name);
      const requestId = checkRequestId(input.requestId);
      const hash = requestHash({ email, name });
      return em
        .transactional(async (tx) => {
          if (requestId) {
            const existing = await findIdempotent(tx, 'CreateUser', requestId, hash);
            if (existing !== null) {
              // Replay the first response: the user as it was created.
              const user = await tx.findOneOrFail(User, existing);
              const first = new User(email, name, user.createdAt);
              first.id = user.id;
              return first;
            }
          }
          await ensureEmailFree(tx, email);
          const now = clock.now();
          const user = new User(email, name, now);
          await tx.persistAndFlush(user);
          await tx.persistAndFlush(new Wallet(user.id, now));
          if (requestId) await saveIdempotent(tx, 'CreateUser', requestId, hash, user.id, now);
          return user;
        })
        .catch(emailTaken);
    },

    get: (em, id) => getLiveUser(em, id),

    async list(em, pageReq, status) {
      const page = readPage(pageReq, { status });
      const rows = await em.find(
        User,
        { id: { $gt: page.afterId }, deletedAt: null, ...(status ? { status } : {}) },
        { orderBy: { id: 'asc' }, limit: page.limit },
      );
      return pageOf(rows, page);
    },

    async update(em, id, changes) {
      const email = changes.email === undefined ? undefined : normalizeEmail(changes.email);
      const name = changes.name === undefined ? undefined : normalizeName(changes.name);
      return em
        .transactional(async (tx) => {
          const user = await getLiveUser(tx, id);
          if (email !== undefined && email !== user.email) {
            await ensureEmailFree(tx, email, id);
            user.email = email;
          }
          if (name !== undefined) user.name = name;
          user.updatedAt = clock.now();
          await tx.flush();
          return user;
        })
        .catch(emailTaken);
    },

    async delete(em, id) {
      await em.transactional(async (tx) => {
        const user = await getLiveUser(tx, id);
        const now = clock.now();
        // Close the wallet first, with a conditional UPDATE of its row: a credit or debit of the same wallet either
        // committed before (then the balance is not zero) or waits for this row (PostgreSQL; SQLite has one writer)
        // and then finds the wallet closed. Whichever commits first wins.
        if (!(await closeEmptyWallet(tx, id, now))) {
          throw failedPrecondition('BALANCE_NOT_ZERO', `user ${id} still has a non-zero wallet balance`);
        }
        const unpaid = await tx.execute<{ n: number }[]>(
          "select count(*) as n from billing_records where user_id = ? and status <> 'PAID'",
          [id],
        );
        if (Number(unpaid[0].n) > 0) {
          throw failedPrecondition('UNPAID_BILLING_RECORDS', `user ${id} has unpaid billing records`);
        }
        user.deletedAt = now;
        user.updatedAt = now;
        await tx.flush();
      });
    },

    async suspend(em, id, reason) {
      const why = reason.trim();
      if (why === '') throw invalidArgument('reason', 'MISSING_REASON', 'reason is required');
      if (why.length > MAX_REASON) throw invalidArgument('reason', 'INVALID_REASON', `reason must be at most ${MAX_REASON} characters`);
      return em.transactional(async (tx) => {
        const user = await getLiveUser(tx, id);
        user.status = 'SUSPENDED';
        user.suspensionReason = why;
        user.suspendedForNonPayment = false;
        user.updatedAt = clock.now();
        await tx.flush();
        return user;
      });
    },

    async activate(em, id) {
      return em.transactional(async (tx) => {
        const user = await getLiveUser(tx, id);
        user.status = 'ACTIVE';
        user.suspensionReason = '';
        user.suspendedForNonPayment = false;
        user.updatedAt = clock.now();
        await tx.flush();
        return user;
      });
    },
  };
}
