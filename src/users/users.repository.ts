/**
 * The door of the `users` table: every write to it goes through a named
 * method here (creating, profile changes, suspension and reactivation by hand
 * or for non-payment, deletion). Reads of one user go through MikroORM (not
 * kept in a unit of work: each write is the ORM's native update, so nothing
 * waits for a flush), lists page by id. Every change that moves a user (created,
 * suspended, reactivated, deleted) appends its event in the same transaction,
 * and only when it did move them.
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Database, Tx } from '../db/database';
import type { EventsRepository } from '../events/events.repository';
import { notFound } from '../shared/errors';
import { pageOf, type Page } from '../shared/paging';
import { User, type UserStatus } from './user.entity';

export interface UsersRepository {
  /** A user that is not deleted, or NOT_FOUND/USER_NOT_FOUND. */
  getLive(em: EntityManager, id: number): Promise<User>;
  /** The id of the live user holding `email`, if any. */
  liveIdByEmail(em: EntityManager, email: string): Promise<number | null>;
  list(em: EntityManager, page: Page, status: UserStatus | null): Promise<{ items: User[]; nextPageToken: string }>;
  /** Inserts a new ACTIVE user. */
  create(tx: Tx, email: string, name: string, now: Date): Promise<User>;
  /** Writes the changed email/name of a user loaded in `tx`'s unit of work. */
  saveProfile(tx: Tx, user: User, changes: { email?: string; name?: string }, now: Date): Promise<void>;
  /** Suspends by hand (an operator's reason); settlement never lifts it. No event when it changes nothing (the same reason again). */
  suspend(tx: Tx, user: User, reason: string, now: Date): Promise<void>;
  /** Reactivates by hand, whatever the suspension was for (no event for a user who was ACTIVE). */
  activate(tx: Tx, user: User, now: Date): Promise<void>;
  /** Marks the user deleted (the caller closed the wallet and checked nothing is unpaid). */
  markDeleted(tx: Tx, user: User, now: Date): Promise<void>;
  /** Suspends an ACTIVE user for non-payment of `billingRecordId`; true when this call suspended them. */
  suspendForNonPayment(tx: Tx, userId: number, billingRecordId: number, reason: string, now: Date): Promise<boolean>;
  /** Reactivates those of `userIds` suspended for non-payment that have no unpaid record left. */
  reactivateIfSettled(tx: Tx, userIds: readonly number[], now: Date): Promise<void>;
  /** True when the user is suspended for non-payment (a committed read). */
  isSuspendedForNonPayment(userId: number): Promise<boolean>;
}

export function createUsersRepository(db: Database, events: EventsRepository): UsersRepository {
  /** Writes the status fields of `user` as they now are. */
  const writeStatus = (tx: Tx, user: User) =>
    tx.em.nativeUpdate(
      User,
      { id: user.id },
      { status: user.status, suspensionReason: user.suspensionReason, suspendedForNonPayment: user.suspendedForNonPayment, updatedAt: user.updatedAt },
    );

  return {
    async getLive(em, id) {
      // Not kept in the unit of work: a change is written by the method that makes it, never by a flush.
      const user = await em.findOne(User, { id, deletedAt: null }, { disableIdentityMap: true });
      if (!user) throw notFound('USER_NOT_FOUND', `user ${id} not found`);
      return user;
    },

    async liveIdByEmail(em, email) {
      const other = await em.findOne(User, { email, deletedAt: null }, { fields: ['id'] });
      return other ? other.id : null;
    },

    async list(em, page, status) {
      const rows = await em.find(
        User,
        { id: { $gt: page.afterId }, deletedAt: null, ...(status ? { status } : {}) },
        { orderBy: { id: 'asc' }, limit: page.limit },
      );
      return pageOf(rows, page);
    },

    async create(tx, email, name, now) {
      const user = new User(email, name, now);
      user.id = Number(await tx.em.insert(User, user));
      await events.append(tx, [{ type: 'user.created', userId: user.id, refId: null, payload: { name, email } }], now);
      return user;
    },

    async saveProfile(tx, user, changes, now) {
      if (changes.email !== undefined) user.email = changes.email;
      if (changes.name !== undefined) user.name = changes.name;
      user.updatedAt = now;
      await tx.em.nativeUpdate(User, { id: user.id }, { email: user.email, name: user.name, updatedAt: now });
    },

    async suspend(tx, user, reason, now) {
      const moved = user.status !== 'SUSPENDED' || user.suspensionReason !== reason || user.suspendedForNonPayment;
      user.status = 'SUSPENDED';
      user.suspensionReason = reason;
      user.suspendedForNonPayment = false;
      user.updatedAt = now;
      await writeStatus(tx, user);
      if (moved) await events.append(tx, [{ type: 'user.suspended', userId: user.id, refId: null, payload: { reason, billingRecordId: 0 } }], now);
    },

    async activate(tx, user, now) {
      const moved = user.status !== 'ACTIVE';
      user.status = 'ACTIVE';
      user.suspensionReason = '';
      user.suspendedForNonPayment = false;
      user.updatedAt = now;
      await writeStatus(tx, user);
      if (moved) await events.append(tx, [{ type: 'user.reactivated', userId: user.id, refId: null, payload: { settled: false } }], now);
    },

    async markDeleted(tx, user, now) {
      user.deletedAt = now;
      user.updatedAt = now;
      await tx.em.nativeUpdate(User, { id: user.id }, { deletedAt: now, updatedAt: now });
      await events.append(tx, [{ type: 'user.deleted', userId: user.id, refId: null, payload: {} }], now);
    },

    async suspendForNonPayment(tx, userId, billingRecordId, reason, now) {
      const changed = await tx.run(
        `update users set status = 'SUSPENDED', suspension_reason = ?, suspended_for_non_payment = ?, updated_at = ?
         where id = ? and status = 'ACTIVE'`,
        [reason, true, now.getTime(), userId],
      );
      if (changed !== 1) return false;
      await events.append(tx, [{ type: 'user.suspended', userId, refId: null, payload: { reason, billingRecordId } }], now);
      return true;
    },

    async reactivateIfSettled(tx, userIds, now) {
      const moved: number[] = [];
      for (let i = 0; i < userIds.length; i += 500) {
        const part = userIds.slice(i, i + 500);
        const rows = await tx.all<{ id: number | string }>(
          `update users set status = 'ACTIVE', suspension_reason = '', suspended_for_non_payment = ?, updated_at = ?
           where id in (${part.map(() => '?').join(', ')}) and status = 'SUSPENDED' and suspended_for_non_payment = ?
             and not exists (select 1 from billing_records b where b.user_id = users.id and b.status <> 'PAID')
           returning id`,
          [false, now.getTime(), ...part, true],
          { keep: part.length === 1 }, // one user (every single charge): one fixed text, kept prepared
        );
        for (const r of rows) moved.push(Number(r.id));
      }
      // Only the users this call moved, in id order.
      moved.sort((a, b) => a - b);
      await events.append(
        tx,
        moved.map((id) => ({ type: 'user.reactivated' as const, userId: id, refId: null, payload: { settled: true } })),
        now,
      );
    },

    async isSuspendedForNonPayment(userId) {
      const rows = await db.read<{ id: number }>(
        `select id from users where id = ? and status = 'SUSPENDED' and suspended_for_non_payment = ?`,
        [userId, true],
      );
      return rows.length > 0;
    },
  };
}
