import type { EntityManager } from '@mikro-orm/knex';

/** True on PostgreSQL, where row locks (FOR UPDATE SKIP LOCKED) exist; SQLite serializes writers instead. */
export const isPostgres = (em: EntityManager): boolean => em.getPlatform().constructor.name.startsWith('PostgreSql');
