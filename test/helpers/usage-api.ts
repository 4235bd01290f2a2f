/**
 * UsageService from a test: events, calls, one StreamUsage stream, and the
 * reference arithmetic the tests compare the service with (written here, not
 * taken from src/, so that a wrong rule in the service cannot agree with
 * itself).
 */
import * as grpc from '@grpc/grpc-js';
import * as usagePb from '../../generated/billing/v1/usage_service';
import { call, type CallOptions } from './harness';

export const R = usagePb.UsageEventStatus;

/** The default PRICING in micros per unit (README, Configuration). */
export const DEFAULT_PRICES: Readonly<Record<string, bigint>> = { 'api-calls': 10_000n, storage: 50_000n, bandwidth: 20_000n, compute: 100_000n };

export const T0 = new Date('2026-11-02T10:00:00Z');

export const event = (id: string, userId: number | bigint, service: string, quantity: string, time: Date | undefined = T0): usagePb.UsageEvent => ({
  id,
  userId: BigInt(userId),
  service,
  quantity,
  time,
});

export const recordUsage = (client: usagePb.UsageServiceClient, events: usagePb.UsageEvent[], opts?: CallOptions) =>
  call(client, 'recordUsage', { events }, opts).then((r) => r.results);

/** `[status name, usage id, reason]` per result, for readable expectations. */
export const brief = (results: usagePb.UsageEventResult[]) =>
  results.map((r) => [usagePb.usageEventStatusToJSON(r.status).replace('USAGE_EVENT_STATUS_', ''), r.usageId, r.reason] as const);

/** A decimal quantity ("12.5") as micro-units. */
export function scaled(quantity: string): bigint {
  const [whole, frac = ''] = quantity.split('.');
  return BigInt(whole) * 1_000_000n + BigInt(frac.padEnd(6, '0'));
}

/** A quantity in micro-units x a unit price in micros, in micros, rounded once, half up. */
export const priced = (quantityScaled: bigint, unitPriceMicros: bigint): bigint => (quantityScaled * unitPriceMicros + 500_000n) / 1_000_000n;

export const micros = (m?: { units: bigint; nanos: number }): bigint => m!.units * 1_000_000n + BigInt(Math.trunc(m!.nanos / 1000));

/**
 * One StreamUsage stream: `send` writes a batch (waiting for the client's own
 * write buffer), acks arrive in `acks`, `done` settles with the stream's
 * status.
 */
export class UsageStream {
  readonly acks: usagePb.StreamUsageResponse[] = [];
  readonly done: Promise<grpc.StatusObject>;
  private readonly call: grpc.ClientDuplexStream<usagePb.StreamUsageRequest, usagePb.StreamUsageResponse>;
  private waiters: { n: number; resolve: () => void }[] = [];

  private readonly onAck?: (ack: usagePb.StreamUsageResponse) => void;

  constructor(
    client: usagePb.UsageServiceClient,
    opts: { deadlineMs?: number; metadata?: grpc.Metadata; read?: boolean; onAck?: (ack: usagePb.StreamUsageResponse) => void } = {},
  ) {
    this.onAck = opts.onAck;
    this.call = client.streamUsage(opts.metadata ?? new grpc.Metadata(), { deadline: Date.now() + (opts.deadlineMs ?? 60_000) });
    this.done = new Promise((resolve) => {
      this.call.on('status', (status: grpc.StatusObject) => resolve(status));
    });
    this.call.on('error', () => undefined); // the status says it
    if (opts.read !== false) this.read();
  }

  /** Starts (or resumes) reading acks. */
  read(): void {
    this.call.on('data', (ack: usagePb.StreamUsageResponse) => {
      this.acks.push(ack);
      this.onAck?.(ack);
      this.waiters = this.waiters.filter((w) => (this.acks.length >= w.n ? (w.resolve(), false) : true));
    });
  }

  /** Writes a batch; resolves when the client could hand it on, or when the stream has ended (then false). */
  send(batchId: string, events: usagePb.UsageEvent[]): Promise<boolean> {
    return new Promise((resolve) => {
      if (this.call.writableEnded || this.call.destroyed) return resolve(false);
      this.call.write({ batchId, events }, () => resolve(true));
      void this.done.then(() => resolve(false));
    });
  }

  /** Resolves once `n` acks arrived. */
  acked(n: number): Promise<void> {
    if (this.acks.length >= n) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ n, resolve }));
  }

  end(): void {
    this.call.end();
  }

  cancel(): void {
    this.call.cancel();
  }
}
