/** The usage events of the usage-api benchmark part, shared by the gRPC client and its raw floor (floor-usage.ts). */

export const BENCH_USERS = 1000;
export const BENCH_SERVICES = ['api-calls', 'storage', 'bandwidth', 'compute'];
export const MONTH_START = Date.UTC(2026, 10, 1);
export const MONTH_MS = 30 * 86_400_000;

export interface BenchUsageEvent {
  id: string;
  userId: number;
  service: string;
  /** Decimal, as sent over gRPC. */
  quantity: string;
  time: Date;
}

/** Event number `k` of the stream tagged `prefix`: users, services and times spread evenly. */
export function benchEvent(prefix: string, k: number): BenchUsageEvent {
  return {
    id: `${prefix}-${k}`,
    userId: 1 + (k % BENCH_USERS),
    service: BENCH_SERVICES[k % BENCH_SERVICES.length],
    quantity: `${1 + (k % 97)}.25`,
    time: new Date(MONTH_START + ((k * 7919) % MONTH_MS)),
  };
}
