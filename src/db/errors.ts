import {
  ConnectionException,
  DeadlockException,
  LockWaitTimeoutException,
  ReadOnlyException,
  UniqueConstraintViolationException,
} from '@mikro-orm/core';

/** True for errors that mean "the database is busy or away; try again". */
export function isTransientDbError(err: unknown): boolean {
  if (
    err instanceof LockWaitTimeoutException ||
    err instanceof DeadlockException ||
    err instanceof ConnectionException ||
    err instanceof ReadOnlyException
  ) {
    return true;
  }
  const code = (err as { code?: unknown })?.code;
  // A connection that died inside a transaction: knex refuses the transaction's next query.
  // Or a database that refuses new connections for a while (ALTER DATABASE ... ALLOW_CONNECTIONS false, 55000).
  if (/Transaction query already complete|Connection terminated|connection is closed|Client has encountered a connection error|is not currently accepting connections/i.test(String((err as Error)?.message))) {
    return true;
  }
  // PostgreSQL classes 08 (connection exception) and 57P (operator intervention: shutdown, terminated backend).
  if (typeof code === 'string' && /^(08|57P)/.test(code)) return true;
  return (
    code === 'SQLITE_BUSY' ||
    code === 'SQLITE_LOCKED' ||
    code === 'SQLITE_CANTOPEN' ||
    code === 'SQLITE_IOERR' ||
    code === 'ECONNREFUSED' ||
    code === 'ECONNRESET' ||
    code === '57P01' || // admin_shutdown
    code === '40001' || // serialization_failure
    code === '40P01' // deadlock_detected
  );
}

export const isUniqueViolation = (err: unknown): boolean =>
  err instanceof UniqueConstraintViolationException ||
  (err as { code?: unknown })?.code === '23505' ||
  /UNIQUE constraint failed/.test(String((err as Error)?.message));
