/**
 * The doors of the tables (one owner each, every write through its named
 * methods) and the balance alerts they feed, built on one database object.
 * The composition root (app.ts) and the usage writer thread
 * (usage/usage-writer.worker.ts) build them the same way, each on its own
 * database object.
 */
import { createBillingRecordsRepository } from './billing/records.repository';
import type { Database } from './db/database';
import { createEventsRepository } from './events/events.repository';
import { createJobRunsRepository } from './jobs/job-runs.repository';
import type { Clock } from './shared/clock';
import { createUsageLogsRepository } from './usage/usage-logs.repository';
import { createUsersRepository } from './users/users.repository';
import { createBalanceAlerts } from './wallets/balance-alerts';
import { createBalanceAlertsRepository } from './wallets/balance-alerts.repository';
import { createLedgerRepository } from './wallets/ledger.repository';

export interface DoorsConfig {
  pricing: ReadonlyMap<string, bigint>;
  /** LOW_BALANCE_THRESHOLD, in micros. */
  lowBalanceThreshold: bigint;
}

export function openDoors(db: Database, clock: Clock, config: DoorsConfig) {
  // The outbox: each owner below appends the events of its changes in the changes' own transactions.
  const events = createEventsRepository(db);
  const userRows = createUsersRepository(db, events);
  const ledger = createLedgerRepository(db, events);
  const records = createBillingRecordsRepository(db, events);
  const usageLogs = createUsageLogsRepository(db);
  const jobRuns = createJobRunsRepository(db, events);
  const alertRows = createBalanceAlertsRepository(db);
  const alerts = createBalanceAlerts({
    db,
    clock,
    alerts: alertRows,
    ledger,
    usageLogs,
    records,
    events,
    pricing: config.pricing,
    defaultThreshold: config.lowBalanceThreshold,
  });
  return { events, userRows, ledger, records, usageLogs, jobRuns, alertRows, alerts };
}
