/**
 * The available balance's rule, shared by the reads of it (WalletsService)
 * and the balance alerts: the balance, minus the recorded, unbilled usage
 * priced as the next billing run will price it (per service, total quantity x
 * today's unit price, rounded once; a service with no price counts 0), minus
 * the unpaid records.
 */
import { lineAmount } from '../shared/money';

/** What the recorded, unbilled usage (service -> quantity) will cost at today's prices. */
export function unbilledValue(totals: ReadonlyMap<string, bigint>, pricing: ReadonlyMap<string, bigint>): bigint {
  let value = 0n;
  for (const [service, quantity] of totals) {
    const price = pricing.get(service);
    if (price !== undefined && quantity > 0n) value += lineAmount(quantity, price);
  }
  return value;
}

export function availableBalance(balance: bigint, totals: ReadonlyMap<string, bigint>, unpaid: bigint, pricing: ReadonlyMap<string, bigint>): bigint {
  return balance - unbilledValue(totals, pricing) - unpaid;
}
