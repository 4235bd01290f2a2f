import { EntitySchema } from '@mikro-orm/core';
import { EpochMsType, Int64Type } from '../db/types';

/** A user's prepaid balance in micros; a cache of the ledger, never below zero. */
export class Wallet {
  userId: number;
  balance = 0n;
  /** Set when the user is deleted; a closed wallet takes no credit or debit (see the wallet_closed migration). */
  closedAt: Date | null = null;
  createdAt: Date;
  updatedAt: Date;

  constructor(userId: number, now: Date) {
    this.userId = userId;
    this.createdAt = now;
    this.updatedAt = now;
  }
}

export type WalletTransactionType = 'CREDIT' | 'DEBIT';

/** One append-only ledger row. */
export class WalletTransaction {
  id!: number;
  userId!: number;
  type!: WalletTransactionType;
  amount!: bigint;
  balanceAfter!: bigint;
  billingRecordId!: number | null;
  requestId!: string | null;
  createdAt!: Date;
}

export const WalletSchema = new EntitySchema<Wallet>({
  class: Wallet,
  tableName: 'wallets',
  properties: {
    userId: { type: 'number', primary: true, autoincrement: false },
    balance: { type: Int64Type },
    closedAt: { type: EpochMsType, nullable: true },
    createdAt: { type: EpochMsType },
    updatedAt: { type: EpochMsType },
  },
});

export const WalletTransactionSchema = new EntitySchema<WalletTransaction>({
  class: WalletTransaction,
  tableName: 'wallet_transactions',
  properties: {
    id: { type: 'number', primary: true, autoincrement: true },
    userId: { type: 'number' },
    type: { type: 'string' },
    amount: { type: Int64Type },
    balanceAfter: { type: Int64Type },
    billingRecordId: { type: 'number', nullable: true },
    requestId: { type: 'string', nullable: true },
    createdAt: { type: EpochMsType },
  },
});
