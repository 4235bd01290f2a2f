import { CronJob } from 'cron';
import type { Logger } from 'pino';
import type { JobsService } from './jobs.types';

export interface Cron {
  start(): void;
  stop(): void;
  /** Resolves when no tick is running. */
  idle(): Promise<void>;
}

/** ProcessAll on a cron expression (UTC). Overlapping ticks are skipped; the body is the job service's. */
export function createCron(deps: { expression: string; jobs: JobsService; log: Logger }): Cron {
  let running: Promise<unknown> = Promise.resolve();
  const job = CronJob.from({
    cronTime: deps.expression,
    timeZone: 'UTC',
    start: false,
    waitForCompletion: true,
    onTick: async () => {
      running = deps.jobs.run('PROCESS_ALL', 'cron');
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
