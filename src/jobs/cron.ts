import { CronJob } from 'cron';
import type { Logger } from 'pino';
import type { JobsService } from './jobs.types';

export interface Cron {
  start(): void;
  stop(): void;
  /** Resolves when no tick is running. */
  idle(): Promise<void>;
}

/**
 * The tick a cron firing belongs to: its nominal time, to the second (cron
 * ticks are whole seconds and fire a few ms after them). Every replica's cron
 * computes the same key for the same tick, whatever its small clock skew.
 */
export const tickKey = (firedAt: Date): string => `PROCESS_ALL@${new Date(Math.floor(firedAt.getTime() / 1000) * 1000).toISOString()}`;

/**
 * ProcessAll on a cron expression (UTC). Overlapping ticks are skipped, and a
 * tick is claimed in the database, so with several replicas it runs once.
 */
export function createCron(deps: { expression: string; jobs: JobsService; log: Logger }): Cron {
  let running: Promise<unknown> = Promise.resolve();
  const job = CronJob.from({
    cronTime: deps.expression,
    timeZone: 'UTC',
    start: false,
    waitForCompletion: true,
    onTick: async () => {
      running = deps.jobs.runForPeriod('PROCESS_ALL', tickKey(new Date()));
      await running;
    },
    errorHandler: (err) => deps.log.error({ err }, 'cron tick failed'),
  });
  return {
    start: () => job.start(),
    stop: () => void job.stop(),
    idle: () => running.then(() => undefined, () => undefined),
  };
}
