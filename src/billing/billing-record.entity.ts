import { EntitySchema } from '@mikro-orm/core';
import { EpochMsType, Int64Type } from '../db/types';

export type BillingRecordStatus = 'PENDING' | 'PAID' | 'FAILED';
export type BillingRecordKind = 'USAGE' | 'MANUAL';

export class BillingRecord {
  id!: number;
  userId!: number;
  kind!: BillingRecordKind;
  amount!: bigint;
  status!: BillingRecordStatus;
  description!: string;
  attemptCount!: number;
  nextAttemptAt!: Date | null;
  failureReason!: string;
  jobRunId!: number | null;
  createdAt!: Date;
  updatedAt!: Date;
  paidAt!: Date | null;
  /** A usage record its ingestion run is still building: not chargeable, not listed. */
  staging!: boolean;
}

/** One service's share of a usage billing record. */
export class LineItem {
  id!: number;
  billingRecordId!: number;
  service!: string;
  /** Total quantity scaled by 10^6. */
  quantity!: bigint;
  unitPrice!: bigint;
  amount!: bigint;
}

export const BillingRecordSchema = new EntitySchema<BillingRecord>({
  class: BillingRecord,
  tableName: 'billing_records',
  properties: {
    id: { type: 'number', primary: true, autoincrement: true },
    userId: { type: 'number' },
    kind: { type: 'string' },
    amount: { type: Int64Type },
    status: { type: 'string' },
    description: { type: 'string' },
    attemptCount: { type: 'number' },
    nextAttemptAt: { type: EpochMsType, nullable: true },
    failureReason: { type: 'string' },
    jobRunId: { type: 'number', nullable: true },
    createdAt: { type: EpochMsType },
    updatedAt: { type: EpochMsType },
    paidAt: { type: EpochMsType, nullable: true },
    staging: { type: 'boolean' },
  },
});

export const LineItemSchema = new EntitySchema<LineItem>({
  class: LineItem,
  tableName: 'line_items',
  properties: {
    id: { type: 'number', primary: true, autoincrement: true },
    billingRecordId: { type: 'number' },
    service: { type: 'string' },
    quantity: { type: Int64Type },
    unitPrice: { type: Int64Type },
    amount: { type: Int64Type },
  },
});
