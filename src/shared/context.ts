/**
 * What a service method gets from its caller: its own unit of work and the
 * caller's cancellation. The gRPC adapter builds one per call (the signal
 * aborts when the client cancels or its deadline passes); jobs build their
 * own. Long work checks `signal` and stops; a write not yet started is not
 * started.
 */
import type { EntityManager } from '@mikro-orm/knex';

export interface CallContext {
  /** A unit of work of this call's own (a fork of the root entity manager). */
  em: EntityManager;
  /** Aborts when the caller has gone away. */
  signal: AbortSignal;
}
