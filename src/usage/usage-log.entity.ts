import { EntitySchema } from '@mikro-orm/core';
import { EpochMsType, Int64Type } from '../db/types';

export type UsageLogStatus = 'PENDING' | 'BILLED' | 'REJECTED';
export type UsageSource = 'FILE' | 'API';

/** One ingested usage entry; `dedupKey` is its identity (see src/usage/entries.ts). */
export class UsageLog {
  id!: number;
  dedupKey!: string;
  userId!: number | null;
  service!: string;
  /** Quantity scaled by 10^6. */
  quantity!: bigint;
  usageAt!: Date | null;
  status!: UsageLogStatus;
  reason!: string;
  billingRecordId!: number | null;
  jobRunId!: number | null;
  ingestedAt!: Date;
  source!: UsageSource;
}

export const UsageLogSchema = new EntitySchema<UsageLog>({
  class: UsageLog,
  tableName: 'usage_logs',
  properties: {
    id: { type: 'number', primary: true, autoincrement: true },
    dedupKey: { type: 'string' },
    userId: { type: 'number', nullable: true },
    service: { type: 'string' },
    quantity: { type: Int64Type },
    usageAt: { type: EpochMsType, nullable: true },
    status: { type: 'string' },
    reason: { type: 'string' },
    billingRecordId: { type: 'number', nullable: true },
    jobRunId: { type: 'number', nullable: true },
    ingestedAt: { type: EpochMsType },
    source: { type: 'string' },
  },
});
