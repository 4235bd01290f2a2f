import { Migration20261124000000Initial } from './Migration20261124000000_initial';
import { Migration20261124010000JobPeriod } from './Migration20261124010000_job_period';
import { Migration20261124020000DropUsageRecordIdx } from './Migration20261124020000_drop_usage_record_idx';
import { Migration20261124030000DropUsageStaging } from './Migration20261124030000_drop_usage_staging';
import { Migration20261202000000WalletClosed } from './Migration20261202000000_wallet_closed';
import { Migration20261202010000JobHeartbeat } from './Migration20261202010000_job_heartbeat';
import { Migration20261202020000IngestionChunks } from './Migration20261202020000_ingestion_chunks';
import { Migration20261202030000UsageApi } from './Migration20261202030000_usage_api';
import { Migration20261203000000Events } from './Migration20261203000000_events';
import { Migration20261203000500EventsMark } from './Migration20261203000500_events_mark';
import { Migration20261203010000JobConflicts } from './Migration20261203010000_job_conflicts';
import { Migration20261203020000PendingIdIdx } from './Migration20261203020000_pending_id_idx';
import { Migration20261207000000UsageRunSealing } from './Migration20261207000000_usage_run_sealing';

/** Every migration, in order. Listed here so that compiled code and ts-jest find them alike. */
export const migrationsList = [
  { name: 'Migration20261124000000_initial', class: Migration20261124000000Initial },
  { name: 'Migration20261124010000_job_period', class: Migration20261124010000JobPeriod },
  { name: 'Migration20261124020000_drop_usage_record_idx', class: Migration20261124020000DropUsageRecordIdx },
  { name: 'Migration20261124030000_drop_usage_staging', class: Migration20261124030000DropUsageStaging },
  { name: 'Migration20261202000000_wallet_closed', class: Migration20261202000000WalletClosed },
  { name: 'Migration20261202010000_job_heartbeat', class: Migration20261202010000JobHeartbeat },
  { name: 'Migration20261202020000_ingestion_chunks', class: Migration20261202020000IngestionChunks },
  { name: 'Migration20261202030000_usage_api', class: Migration20261202030000UsageApi },
  { name: 'Migration20261203000000_events', class: Migration20261203000000Events },
  { name: 'Migration20261203000500_events_mark', class: Migration20261203000500EventsMark },
  { name: 'Migration20261203010000_job_conflicts', class: Migration20261203010000JobConflicts },
  { name: 'Migration20261203020000_pending_id_idx', class: Migration20261203020000PendingIdIdx },
  { name: 'Migration20261207000000_usage_run_sealing', class: Migration20261207000000UsageRunSealing },
];
