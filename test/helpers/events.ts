/**
 * Event stream helpers: events appended through the door (the events
 * repository, in a transaction of the app's database), a WatchEvents stream
 * that collects what it receives, and ListEvents read to the end.
 */
import * as grpc from '@grpc/grpc-js';
import type { App } from '../../src/app';
import { createEventsRepository } from '../../src/events/events.repository';
import type { Database } from '../../src/db/database';
import type { EventType, NewEvent, StoredEvent } from '../../src/events/events.types';
import * as eventPb from '../../generated/billing/v1/event_service';
import { call } from './harness';

/** A user.created event for `userId` (a test's stand-in for any change). */
export const userCreated = (userId: number, n: number): NewEvent => ({
  type: 'user.created',
  userId,
  refId: null,
  payload: { name: `u${n}`, email: `u${n}@example.com` },
});

/** Appends `events` in one transaction of `app`'s database, stamped `now`. */
export async function append(app: App, events: readonly NewEvent[], now = new Date()): Promise<void> {
  const door = createEventsRepository(app.db);
  await app.db.transaction((tx) => door.append(tx, events, now));
}

export interface StreamEnd {
  code: grpc.status;
  reason: string | undefined;
  details: string;
}

/** A WatchEvents stream that collects its events and its end. */
export class Watch {
  readonly events: eventPb.Event[] = [];
  readonly call: grpc.ClientReadableStream<eventPb.WatchEventsResponse>;
  /** The stream's status (OK never comes: a watch ends by cancel or error). */
  readonly ended: Promise<StreamEnd>;
  private waiters: (() => void)[] = [];
  private end: StreamEnd | null = null;

  constructor(client: eventPb.EventServiceClient, request: Partial<eventPb.WatchEventsRequest> = {}, opts: { paused?: boolean } = {}) {
    this.call = client.watchEvents({ afterCursor: '', types: [], userId: 0n, ...request });
    if (opts.paused) this.call.pause();
    this.call.on('data', (r: eventPb.WatchEventsResponse) => {
      this.events.push(r.event!);
      this.notify();
    });
    this.call.on('error', () => undefined); // the status below says it all
    this.ended = new Promise((resolve) =>
      this.call.on('status', (s: grpc.StatusObject) => {
        const reason = s.metadata.get('billing-error-reason')[0];
        this.end = { code: s.code, reason: reason === undefined ? undefined : String(reason), details: s.details };
        this.notify();
        resolve(this.end);
      }),
    );
  }

  private notify(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** The cursors received, in order. */
  get cursors(): string[] {
    return this.events.map((e) => e.cursor);
  }

  get lastCursor(): string {
    return this.events.at(-1)?.cursor ?? '';
  }

  /** Waits until at least `n` events came (fails on the stream's end or after `timeoutMs`). */
  async until(n: number, timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.events.length < n) {
      if (this.end) throw new Error(`the watch ended (${grpc.status[this.end.code]} ${this.end.reason}) after ${this.events.length} of ${n} events`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`only ${this.events.length} of ${n} events within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  cancel(): void {
    this.call.cancel();
  }
}

/** Every event ListEvents returns after `afterCursor`, page by page. */
export async function listAll(client: eventPb.EventServiceClient, request: Partial<eventPb.ListEventsRequest> = {}): Promise<eventPb.Event[]> {
  const all: eventPb.Event[] = [];
  let cursor = request.afterCursor ?? '';
  for (;;) {
    const page = await call(client, 'listEvents', { types: [], userId: 0n, pageSize: 500, ...request, afterCursor: cursor });
    all.push(...page.events);
    if (page.events.length === 0) return all;
    cursor = page.nextCursor;
  }
}

/** Strictly increasing as numbers (and as equal-length strings). */
export function expectIncreasing(cursors: readonly string[]): void {
  for (let i = 1; i < cursors.length; i++) {
    if (!(BigInt(cursors[i]) > BigInt(cursors[i - 1]))) throw new Error(`cursor ${cursors[i]} at ${i} does not follow ${cursors[i - 1]}`);
  }
}

/** Resolves once `check()` holds (polled), or fails after `timeoutMs`. */
export async function eventually(what: string, check: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Every committed event (or those of `types`), oldest first, read page by page through the events' door. */
export async function allEvents(db: Database, types?: readonly EventType[]): Promise<StoredEvent[]> {
  const events = createEventsRepository(db);
  const out: StoredEvent[] = [];
  for (let afterId = 0; ; ) {
    const page = await events.list({ afterId, types }, 1000);
    out.push(...page);
    if (page.length < 1000) return out;
    afterId = page[page.length - 1].id;
  }
}

/** How many events of each type, and whether their ids strictly increase in the order they are listed. */
export async function eventSummary(db: Database): Promise<{ byType: Partial<Record<EventType, number>>; increasing: boolean }> {
  const list = await allEvents(db);
  const byType: Partial<Record<EventType, number>> = {};
  for (const e of list) byType[e.type] = (byType[e.type] ?? 0) + 1;
  return { byType, increasing: list.every((e, i) => i === 0 || e.id > list[i - 1].id) };
}
