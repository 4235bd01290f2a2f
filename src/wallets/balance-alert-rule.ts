/**
 * The balance-alert rule: where an available balance stands against a
 * low-balance threshold, and which events a move from one state to another
 * writes. Pure, so every path that moves an available balance asks the same
 * rule (./balance-alerts.ts) and the unit tests pin it down.
 */
import type { NewEvent } from '../events/events.types';

/** OK: at or above the threshold; LOW: below it and above zero; DEPLETED: zero or below. */
export type AlertState = 'OK' | 'LOW' | 'DEPLETED';

export const ALERT_STATES: readonly AlertState[] = ['OK', 'LOW', 'DEPLETED'];

export function alertState(available: bigint, threshold: bigint): AlertState {
  if (available <= 0n) return 'DEPLETED';
  return available < threshold ? 'LOW' : 'OK';
}

/**
 * The events of a move from `from` to `to` (nothing when they are equal):
 * OK->LOW balance.low; OK->DEPLETED balance.low (only with a threshold above
 * zero: with 0 there is no low band to cross) then balance.depleted;
 * LOW->DEPLETED balance.depleted; LOW->OK and DEPLETED->OK balance.recovered;
 * DEPLETED->LOW nothing (the user is still low, and was told so).
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
