/**
 * Fires retries when they are due, in real time. The schedule lives in the
 * database (billing_records.next_attempt_at), so a restarted process picks it
 * up where it stopped: on start the scheduler reads the earliest due time and
 * sets one timer for it. Charges that schedule a retry wake it early; a
 * periodic look catches retries scheduled by other replicas. The same look
 * runs the settlement sweep when an unpaid record's wallet can pay it now (a
 * settlement after a top-up failed, or ran on another replica that died), and
 * a failed settlement asks for a sweep within a second.
 */
import type { Logger } from 'pino';
import type { BillingService } from '../billing/billing.service';
import type { Database } from '../db/database';
import type { Clock } from '../shared/clock';
import type { JobsService } from './jobs.types';

export interface RetryScheduler {
  start(): Promise<void>;
  stop(): Promise<void>;
  /** A retry is due at `at`: make sure the timer fires by then. */
  wake(at: Date): void;
  /** A settlement failed: sweep for settleable records soon. */
  requestSweep(): void;
}

export interface RetrySchedulerDeps {
  db: Database;
  clock: Clock;
  log: Logger;
  billing: Pick<BillingService, 'nextDueTime' | 'hasSettleable'>;
  jobs: JobsService;
  /** Longest sleep between looks at the database (default 30 s). */
  pollMs?: number;
}

export function createRetryScheduler(deps: RetrySchedulerDeps): RetryScheduler {
  const { clock, log } = deps;
  const pollMs = deps.pollMs ?? 30_000;
  let timer: NodeJS.Timeout | null = null;
  let timerAt = Infinity;
  let stopped = true;
  let loop: Promise<void> = Promise.resolve();
  let lastSweep = -Infinity;

  function arm(atMs: number): void {
    if (stopped) return;
    const target = Math.min(atMs, clock.now().getTime() + pollMs);
    if (timer && target >= timerAt) return;
    if (timer) clearTimeout(timer);
    timerAt = target;
    timer = setTimeout(fire, Math.max(0, target - clock.now().getTime()));
  }

  function fire(): void {
    timer = null;
    timerAt = Infinity;
    loop = loop.then(tick, tick);
  }

  async function tick(): Promise<void> {
    if (stopped) return;
    try {
      const em = deps.db.fork();
      const now = clock.now().getTime();
      const due = await deps.billing.nextDueTime(em);
      const sweep = now - lastSweep >= pollMs;
      if ((due && due.getTime() <= now) || (sweep && (await deps.billing.hasSettleable()))) {
        await deps.jobs.run('PROCESS_RETRIES', 'scheduler'); // due retries, then the settlement sweep
      }
      if (sweep) lastSweep = now;
      const next = await deps.billing.nextDueTime(deps.db.fork());
      arm(next ? next.getTime() : Infinity);
    } catch (err) {
      log.error({ err }, 'retry scheduler tick failed; trying again shortly');
      arm(clock.now().getTime() + 1000);
    }
  }

  return {
    async start() {
      stopped = false;
      await tick();
    },
    async stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      timer = null;
      await loop;
    },
    wake(at) {
      arm(at.getTime());
    },
    requestSweep() {
      lastSweep = -Infinity;
      arm(clock.now().getTime() + 1000);
    },
  };
}
