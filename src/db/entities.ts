import { BillingRecordSchema, LineItemSchema } from '../billing/billing-record.entity';
import { JobRunSchema } from '../jobs/job-run.entity';
import { UsageLogSchema } from '../usage/usage-log.entity';
import { UserSchema } from '../users/user.entity';
import { WalletSchema, WalletTransactionSchema } from '../wallets/wallet.entity';

export const entities = [
  UserSchema,
  WalletSchema,
  WalletTransactionSchema,
  BillingRecordSchema,
  LineItemSchema,
  UsageLogSchema,
  JobRunSchema,
];
