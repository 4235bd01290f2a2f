/**
 * The hand-over of a watcher from its history to live events, on an
 * in-memory events table whose reads the test can hold: events committed
 * while a history read is in flight, and more events than the watcher's
 * buffer while it is still sending its history, all arrive once, in order.
 */
import pino from 'pino';
import { createEventsService, type EventsService } from '../../src/events/events.service';
import type { EventFilter, EventsRepository } from '../../src/events/events.repository';
import type { StoredEvent } from '../../src/events/events.types';
import { noMetrics } from '../../src/shared/metrics';
import { systemClock } from '../../src/shared/clock';

/** Committed events in memory; `hold` makes the next history read (limit 500) wait for the test. */
class MemoryEvents implements EventsRepository {
  rows: StoredEvent[] = [];
  private holds: ((filter: EventFilter) => Promise<void>)[] = [];
  commit(n: number): void {
    for (let i = 0; i < n; i++) {
      const id = this.rows.length + 1;
      this.rows.push({ id, type: 'user.created', userId: 1, refId: null, payload: { name: `u${id}`, email: 'e' }, createdAt: new Date() });
    }
  }
  /** The next watcher history read runs `gate` after reading and before answering. */
  hold(gate: (filter: EventFilter) => Promise<void>): void {
    this.holds.push(gate);
  }
  append(): Promise<void> {
    throw new Error('not used');
  }
  async list(filter: EventFilter, limit: number): Promise<StoredEvent[]> {
    const rows = this.rows.filter((e) => e.id > filter.afterId).slice(0, limit);
    const gate = limit === 500 ? this.holds.shift() : undefined;
    if (gate) await gate(filter);
    return rows;
  }
  async lastId(): Promise<number> {
    return this.rows.length;
  }
  async retention() {
    return { prunedThrough: 0, prunedBefore: new Date(0) };
  }
  async prune(): Promise<number> {
    return 0;
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(what: string, check: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !check(); i++) await sleep(5);
  if (!check()) throw new Error(`never: ${what}`);
}

describe('a watcher between history and live events', () => {
  let repo: MemoryEvents;
  let service: EventsService;
  let abort: AbortController;
  const make = (watchBuffer: number) =>
    createEventsService({ events: repo, clock: systemClock, log: pino({ level: 'silent' }), metrics: noMetrics, retentionMs: 86_400_000, pollMs: 1, watchBuffer });

  beforeEach(() => {
    repo = new MemoryEvents();
    abort = new AbortController();
  });
  afterEach(async () => {
    abort.abort(new Error('test over'));
    await service.stop();
  });

  const watchInto = (got: number[], send: (e: StoredEvent, signal: AbortSignal) => Promise<void> = async () => undefined) => {
    const ended = service
      .watch({ afterCursor: '', types: [], userId: null }, async (e, signal) => {
        await send(e, signal);
        got.push(e.id);
      }, abort.signal)
      .catch((err: unknown) => err);
    return ended;
  };

  it('gets the events the hub found while its last history read was in flight', async () => {
    service = make(1000);
    repo.commit(3);
    // Another watcher keeps the hub running.
    const other: number[] = [];
    void watchInto(other);
    await until('the first watcher has the history', () => other.length === 3);
    const got: number[] = [];
    repo.hold(async () => {
      // The read has seen 1..3; 4..6 commit and the hub hands them out before the read answers.
      repo.commit(3);
      await until('the hub found 4..6', () => other.length === 6);
    });
    void watchInto(got);
    await until('the second watcher has all six', () => got.length >= 6);
    await sleep(20);
    expect(got).toEqual([1, 2, 3, 4, 5, 6]);
  });

  it('reads on from the database when more events than its buffer commit while it sends its history', async () => {
    service = make(10);
    repo.commit(5);
    const got: number[] = [];
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    let hub: number[] = [];
    const other = watchInto((hub = []));
    void other;
    await until('the hub runs', () => hub.length === 5);
    const ended = watchInto(got, async (e) => {
      // The first history event waits until the hub has handed out more than the buffer holds.
      if (e.id === 1) await released;
    });
    await sleep(10);
    // 25 more, a few at a time (the other watcher keeps up; this one's queue of 10 overflows).
    for (let i = 0; i < 5; i++) {
      repo.commit(5);
      await until('the hub found them', () => hub.length === 10 + i * 5);
    }
    release();
    await until('all 30 arrive', () => got.length >= 30);
    await sleep(20);
    expect(got).toEqual(Array.from({ length: 30 }, (_, i) => i + 1));
    // Still watching: an overflow while reading history is no reason to end the stream.
    repo.commit(1);
    await until('a live one', () => got.length === 31);
    abort.abort(new Error('done'));
    expect(await ended).toEqual(new Error('done'));
  });

  it('ends with CONSUMER_TOO_SLOW once live, even while its send waits for the transport', async () => {
    service = make(10);
    const got: number[] = [];
    let blocked = false;
    const ended = watchInto(got, async (_e, signal) => {
      blocked = true;
      // Never drains; gives up as the signal aborts, as the transport's send does.
      await new Promise((_resolve, reject) => signal.addEventListener('abort', () => reject(signal.reason)));
    });
    await until('the watcher is live', () => service.watchers === 1);
    await sleep(10);
    repo.commit(1);
    await until('its send blocks', () => blocked);
    repo.commit(20);
    const err = (await ended) as { kind: string; reason: string };
    expect({ kind: err.kind, reason: err.reason }).toEqual({ kind: 'RESOURCE_EXHAUSTED', reason: 'CONSUMER_TOO_SLOW' });
    expect(service.watchers).toBe(0);
  });
});
