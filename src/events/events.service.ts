/**
 * The event stream's service: ListEvents pages, WatchEvents streams, and the
 * retention that deletes old events.
 *
 * Watching. One hub per process looks for new events, and only while at
 * least one watcher is open: every `pollMs` it reads the events after the
 * last id it saw (one query for all watchers, through db.read: on SQLite a
 * read-only connection that never waits for the writer; on PostgreSQL the
 * pool, so events committed by any replica are found the same way) and hands
 * each to the watchers whose filter it matches. Each watcher:
 *
 * 1. joins the hub first, so that from then on every new event the hub finds
 *    is queued for it;
 * 2. reads its history from the database in pages after its cursor, sending
 *    each event (and waiting whenever the transport says it is full), and
 *    drops from its queue what history already sent;
 * 3. once a history read comes back short, switches to the queue: whatever
 *    the hub found before the watcher joined had committed before that read
 *    began (ids become visible in commit order, see events.repository.ts),
 *    and whatever it found since is in the queue. Events in both are sent
 *    once: nothing at or below the last id sent is sent again.
 *
 * The queue is bounded (`watchBuffer`). While history is being read an
 * overflow only empties it (history is read from the database anyway, and
 * the switch waits for one more short read after the overflow). Once live,
 * an overflow ends the stream with RESOURCE_EXHAUSTED [CONSUMER_TOO_SLOW]:
 * the consumer watches again from its last cursor, and history serves it.
 *
 * Delivery is at least once across streams (a consumer that resumes from an
 * older cursor than it handled gets those events again) and exactly once in
 * order within one stream.
 */
import type { Logger } from 'pino';
import type { Clock } from '../shared/clock';
import { AppError, invalidArgument } from '../shared/errors';
import type { Metrics } from '../shared/metrics';
import { pageSizeOf } from '../shared/paging';
import type { EventFilter, EventsRepository } from './events.repository';
import { cursorOf, EVENT_TYPES, type EventType, type StoredEvent } from './events.types';

export interface EventQuery {
  /** The last cursor handled; '' starts at the oldest event kept. */
  afterCursor: string;
  /** Only these types (names as in EVENT_TYPES); empty: all. */
  types: readonly string[];
  /** Only this user's events; null: all. */
  userId: number | null;
}

export interface EventPage {
  events: StoredEvent[];
  /** The last event's cursor, or the query's cursor when there is none. */
  nextCursor: string;
}

/**
 * Hands one event to the transport; resolves when the next may follow (it
 * waits while the transport is full), rejects with the signal's reason as soon
 * as `signal` aborts.
 */
export type SendEvent = (event: StoredEvent, signal: AbortSignal) => Promise<void>;

export interface EventsService {
  /** One page of events after the cursor, oldest first (page size 0: 100; at most 500). */
  list(query: EventQuery & { pageSize: number }): Promise<EventPage>;
  /**
   * Sends the events after the cursor, history then live, until `signal`
   * aborts (then it rejects with the signal's reason) or the watcher falls
   * too far behind (RESOURCE_EXHAUSTED [CONSUMER_TOO_SLOW]). Never resolves.
   */
  watch(query: EventQuery, send: SendEvent, signal: AbortSignal): Promise<never>;
  /** Deletes the events older than the retention now; returns how many. */
  prune(): Promise<number>;
  /** Prunes at once (in the background) and then every `pruneIntervalMs`. */
  start(): void;
  /** Stops pruning and the hub; waits for what they were doing. Watchers are ended by their streams (shutdown). */
  stop(): Promise<void>;
  /** Watchers open now. */
  readonly watchers: number;
}

export interface EventsServiceDeps {
  events: EventsRepository;
  clock: Clock;
  log: Logger;
  metrics: Metrics;
  /** EVENT_RETENTION (ms). */
  retentionMs: number;
  /** EVENT_POLL_MS. */
  pollMs: number;
  /** EVENT_WATCH_BUFFER. */
  watchBuffer: number;
  /** Between two prunes (default 10 minutes). */
  pruneIntervalMs?: number;
}

/** ListEvents' page size when none is asked for (at most MAX_PAGE_SIZE, as every list). */
export const DEFAULT_LIST_PAGE_SIZE = 100;
/** Events per history read of a watcher, and per read of the hub. */
const HISTORY_PAGE = 500;
const HUB_PAGE = 1000;
const PRUNE_INTERVAL_MS = 10 * 60 * 1000;
/** Cursors are ids, at most 16 digits (cursorOf pads to 16). */
const CURSOR = /^\d{1,16}$/;
const KNOWN_TYPES: ReadonlySet<string> = new Set(EVENT_TYPES);

interface ParsedQuery {
  filter: EventFilter;
  /** A cursor was given (not ''): it may have expired. */
  cursorGiven: boolean;
}

function parseQuery(query: EventQuery): ParsedQuery {
  const cursor = query.afterCursor;
  if (cursor !== '' && (!CURSOR.test(cursor) || !Number.isSafeInteger(Number(cursor)))) {
    throw invalidArgument('after_cursor', 'INVALID_CURSOR', 'after_cursor must be a cursor from an event (decimal digits), or empty');
  }
  for (const type of query.types) {
    if (!KNOWN_TYPES.has(type)) {
      throw invalidArgument('types', 'UNKNOWN_EVENT_TYPE', `types: ${JSON.stringify(type)} is not an event type (known: ${EVENT_TYPES.join(', ')})`);
    }
  }
  return {
    filter: {
      afterId: cursor === '' ? 0 : Number(cursor),
      types: [...new Set(query.types)] as EventType[],
      userId: query.userId ?? 0,
    },
    cursorGiven: cursor !== '',
  };
}

const matcher = (filter: EventFilter): ((e: StoredEvent) => boolean) => {
  const types = filter.types && filter.types.length > 0 ? new Set<string>(filter.types) : null;
  const userId = filter.userId ?? 0;
  return (e) => (userId === 0 || e.userId === userId) && (types === null || types.has(e.type));
};

/** Events waiting for one watcher, oldest first (an array with a moving head: shift() on a long array is O(n)). */
class EventQueue {
  private items: StoredEvent[] = [];
  private head = 0;
  get length(): number {
    return this.items.length - this.head;
  }
  push(e: StoredEvent): void {
    this.items.push(e);
  }
  peek(): StoredEvent | undefined {
    return this.items[this.head];
  }
  shift(): StoredEvent | undefined {
    const e = this.items[this.head];
    if (e === undefined) return undefined;
    this.items[this.head++] = undefined as unknown as StoredEvent;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return e;
  }
  clear(): void {
    this.items = [];
    this.head = 0;
  }
}

interface Watcher {
  matches: (e: StoredEvent) => boolean;
  queue: EventQueue;
  /** The last id sent. */
  position: number;
  /** Sending from the queue (history done): an overflow now ends the stream. */
  live: boolean;
  /** How often the queue overflowed while history was read (and was emptied). */
  resets: number;
  /** Aborted when the queue overflows while live: ends the stream, even while a send waits for the transport. */
  halt: AbortController;
  /** Wakes the watcher waiting for its queue. */
  wake: (() => void) | null;
}

export function createEventsService(deps: EventsServiceDeps): EventsService {
  const { events, clock, log, metrics, retentionMs, pollMs, watchBuffer } = deps;
  // One read of the hub never hands a watcher more than its buffer holds: between reads, watchers send.
  const hubPage = Math.min(HUB_PAGE, watchBuffer);
  const pruneIntervalMs = deps.pruneIntervalMs ?? PRUNE_INTERVAL_MS;

  // ---- the hub ---------------------------------------------------------------
  const watchers = new Set<Watcher>();
  /** The largest id the hub has handed out; null while it is not running. */
  let seen: number | null = null;
  let starting: Promise<void> | null = null;
  let loop: Promise<void> | null = null;
  let stopped = false;
  let sleepTimer: NodeJS.Timeout | null = null;
  let wakeLoop: (() => void) | null = null;
  let failing = false;

  const tooSlow = (position: number) =>
    new AppError(
      'RESOURCE_EXHAUSTED',
      'CONSUMER_TOO_SLOW',
      `the stream fell more than ${watchBuffer} events behind; watch again after the last cursor handled ` +
        `(the last one sent was ${position === 0 ? 'none' : cursorOf(position)})`,
    );

  const dispatch = (batch: readonly StoredEvent[]) => {
    for (const w of watchers) {
      if (w.halt.signal.aborted) continue;
      for (const e of batch) {
        if (!w.matches(e)) continue;
        if (w.queue.length >= watchBuffer) {
          w.queue.clear();
          if (w.live) {
            w.halt.abort(tooSlow(w.position));
            break;
          }
          w.resets++;
        }
        w.queue.push(e);
      }
      w.wake?.();
    }
  };

  const pollOnce = async () => {
    for (;;) {
      const from = seen;
      if (from === null) return;
      const batch = await events.list({ afterId: from }, hubPage);
      if (seen !== from) return; // stopped (and maybe restarted) meanwhile
      if (batch.length > 0) {
        dispatch(batch);
        seen = batch[batch.length - 1].id;
      }
      if (batch.length < hubPage) return;
    }
  };

  const runLoop = async () => {
    while (watchers.size > 0 && !stopped) {
      await new Promise<void>((resolve) => {
        wakeLoop = resolve;
        sleepTimer = setTimeout(resolve, pollMs);
      });
      sleepTimer = null;
      wakeLoop = null;
      if (watchers.size === 0 || stopped) break;
      try {
        await pollOnce();
        if (failing) log.info('events: reading new events again');
        failing = false;
      } catch (err) {
        // Once per outage, not once per interval.
        if (!failing) log.warn({ err }, 'events: could not read new events; trying again every interval');
        failing = true;
      }
    }
    // Nobody watches: forget the position (the next watcher starts the hub again from the newest id).
    seen = null;
    loop = null;
  };

  /** Resolves once the hub runs and will queue for `w` every event it finds from now on. */
  const join = async (w: Watcher) => {
    watchers.add(w);
    metrics.eventWatchers(watchers.size);
    // One start at a time; again if the hub stopped meanwhile (every other watcher left).
    while (seen === null) {
      starting ??= events
        .lastId()
        .then((id) => {
          if (seen === null) seen = id;
        })
        .finally(() => (starting = null));
      await starting;
    }
    loop ??= runLoop();
  };

  const leave = (w: Watcher) => {
    if (!watchers.delete(w)) return;
    w.queue.clear();
    metrics.eventWatchers(watchers.size);
    if (watchers.size === 0) {
      if (sleepTimer) clearTimeout(sleepTimer);
      wakeLoop?.();
    }
  };

  // ---- retention ------------------------------------------------------------
  const expired = (cursorId: number, prunedThrough: number) =>
    new AppError(
      'OUT_OF_RANGE',
      'CURSOR_EXPIRED',
      `cursor ${cursorOf(cursorId)} is older than the events kept (EVENT_RETENTION): events through ${cursorOf(prunedThrough)} ` +
        'were deleted. Start again with an empty after_cursor (the oldest event kept) and reconcile with the current state',
    );

  /** Fails if events after `afterId` may have been deleted (read after the events it guards: a prune between shows). */
  const checkKept = async (afterId: number) => {
    const { prunedThrough } = await events.retention();
    if (prunedThrough > afterId) throw expired(afterId, prunedThrough);
  };

  let pruning: Promise<number> | null = null;
  let pruneTimer: NodeJS.Timeout | null = null;
  const prune = () =>
    (pruning ??= (async () => {
      try {
        const before = new Date(clock.now().getTime() - retentionMs);
        const n = await events.prune(before);
        if (n > 0) log.info({ deleted: n, before }, 'events: deleted events older than the retention');
        return n;
      } finally {
        pruning = null;
      }
    })());
  const pruneInBackground = () => {
    if (stopped) return;
    prune().catch((err: unknown) => log.warn({ err }, 'events: pruning failed; trying again later'));
  };

  // ---- the RPCs -------------------------------------------------------------
  return {
    get watchers() {
      return watchers.size;
    },

    async list(query) {
      const { filter, cursorGiven } = parseQuery(query);
      const size = pageSizeOf(query.pageSize, DEFAULT_LIST_PAGE_SIZE);
      const page = await events.list(filter, size);
      if (cursorGiven) await checkKept(filter.afterId);
      return { events: page, nextCursor: page.length > 0 ? cursorOf(page[page.length - 1].id) : query.afterCursor };
    },

    async watch(query, send, callSignal) {
      const { filter, cursorGiven } = parseQuery(query);
      callSignal.throwIfAborted();
      const halt = new AbortController();
      const w: Watcher = { matches: matcher(filter), queue: new EventQueue(), position: filter.afterId, live: false, resets: 0, halt, wake: null };
      // The call going away, or this watcher falling behind, ends the watch (one listener per watch).
      const signal = halt.signal;
      const onCallAbort = () => halt.abort(callSignal.reason);
      callSignal.addEventListener('abort', onCallAbort, { once: true });
      const onAbort = () => w.wake?.();
      signal.addEventListener('abort', onAbort, { once: true });
      const deliver = async (e: StoredEvent) => {
        signal.throwIfAborted();
        await send(e, signal);
        w.position = e.id;
        metrics.eventSent((clock.now().getTime() - e.createdAt.getTime()) / 1000);
      };
      try {
        await join(w);
        // History, page by page, until a read comes back short with no overflow since it began.
        for (let first = true; ; first = false) {
          signal.throwIfAborted();
          const resets = w.resets;
          const page = await events.list({ ...filter, afterId: w.position }, HISTORY_PAGE);
          if (cursorGiven || !first) await checkKept(w.position);
          for (const e of page) await deliver(e);
          while ((w.queue.peek()?.id ?? Infinity) <= w.position) w.queue.shift();
          if (page.length < HISTORY_PAGE && w.resets === resets) break;
        }
        w.live = true;
        for (;;) {
          signal.throwIfAborted();
          const e = w.queue.shift();
          if (e === undefined) {
            await new Promise<void>((resolve) => (w.wake = resolve));
            w.wake = null;
            continue;
          }
          if (e.id > w.position) await deliver(e);
        }
      } finally {
        callSignal.removeEventListener('abort', onCallAbort);
        signal.removeEventListener('abort', onAbort);
        leave(w);
      }
    },

    prune,

    start() {
      pruneInBackground();
      pruneTimer = setInterval(pruneInBackground, pruneIntervalMs);
      pruneTimer.unref();
    },

    async stop() {
      stopped = true;
      if (pruneTimer) clearInterval(pruneTimer);
      if (sleepTimer) clearTimeout(sleepTimer);
      wakeLoop?.();
      await Promise.all([pruning?.catch(() => undefined), loop, starting?.catch(() => undefined)]);
    },
  };
}
