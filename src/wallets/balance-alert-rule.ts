/**
 * The balance-alert rule: where an available balance stands against a
 * low-balance threshold, and which events a move from one state to another
 * writes. Pure, so every path that moves an available balance asks the same
 * rule (./balance-alerts.ts) and the unit tests pin it down.
 */
import type { NewEvent } from '../events/events.types';

/**
 * The stored state is a latch: it changes only with an event, so a user's
 * events replayed always end in their state, and a reader never sees two
 * balance.low or two balance.depleted without a balance.recovered between.
 * OK: at or above the threshold (and above zero); LOW: went below the
 * threshold, not to zero; DEPLETED: went to zero or below, and has not been
 * back at or above the threshold since.
 */
export type AlertState = 'OK' | 'LOW' | 'DEPLETED';

export const ALERT_STATES: readonly AlertState[] = ['OK', 'LOW', 'DEPLETED'];

/** Where an available balance stands: DEPLETED at zero or below, else LOW below the threshold, else OK. */
export function alertBand(available: bigint, threshold: bigint): AlertState {
  if (available <= 0n) return 'DEPLETED';
  return available < threshold ? 'LOW' : 'OK';
}

/**
 * The state after the available balance (or the threshold) moved: into the
 * band it now stands in, except from DEPLETED into LOW (above zero but still
 * low: it stays DEPLETED, without an event, until it recovers).
 */
export function nextAlertState(from: AlertState, available: bigint, threshold: bigint): AlertState {
  const band = alertBand(available, threshold);
  return from === 'DEPLETED' && band === 'LOW' ? 'DEPLETED' : band;
}

/**
 * The events of a move from `from` to `to` (nothing when they are equal):
 * OK->LOW balance.low; OK->DEPLETED balance.low (only with a threshold above
 * zero: with 0 there is no low band to cross) then balance.depleted;
 * LOW->DEPLETED balance.depleted; LOW->OK and DEPLETED->OK balance.recovered.
 * (DEPLETED->LOW never happens, see nextAlertState.)
 */
export function alertEvents(userId: number, from: AlertState, to: AlertState, available: bigint, threshold: bigint): NewEvent[] {
  const low: NewEvent = { type: 'balance.low', userId, refId: null, payload: { availableBalance: available, threshold } };
  const depleted: NewEvent = { type: 'balance.depleted', userId, refId: null, payload: { availableBalance: available } };
  const recovered: NewEvent = { type: 'balance.recovered', userId, refId: null, payload: { availableBalance: available, threshold } };
  if (from === to) return [];
  if (to === 'OK') return [recovered];
  if (to === 'LOW') return from === 'OK' ? [low] : [];
  return from === 'OK' && threshold > 0n ? [low, depleted] : [depleted];
}
