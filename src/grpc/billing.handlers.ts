/** BillingService: protobuf in, one BillingService call, protobuf out. */
import type { BillingService } from '../billing/billing.service';
import type { UsageService } from '../usage/usage.service';
import { toId } from '../shared/ids';
import { moneyToMicros } from '../shared/money';
import * as pb from '../../generated/billing/v1/billing_service';
import type { Unary } from './adapter';
import {
  billingRecordToPb,
  chargeOutcomeToPb,
  pageRequest,
  parseBillingRecordStatusFilter,
  parseUsageLogStatusFilter,
  parseUsageSourceFilter,
  usageLogToPb,
  userIdFilter,
} from './convert';

export interface BillingHandlersDeps {
  unary: Unary;
  billing: BillingService;
  usage: UsageService;
  /** The deployment's currency (ISO 4217). */
  currency: string;
}

export function createBillingHandlers({ unary, billing, usage, currency }: BillingHandlersDeps): pb.BillingServiceServer {
  return {
    createBillingRecord: unary<pb.CreateBillingRecordRequest, pb.CreateBillingRecordResponse>(
      'CreateBillingRecord',
      async (req, ctx) => {
        const result = await billing.createManualRecord(ctx, {
          userId: toId(req.userId, 'user_id'),
          amount: moneyToMicros(req.amount, currency, 'amount'),
          description: req.description,
          requestId: req.requestId,
        });
        return { billingRecord: billingRecordToPb(result, currency), outcome: chargeOutcomeToPb(result.outcome) };
      },
    ),

    getBillingRecord: unary<pb.GetBillingRecordRequest, pb.GetBillingRecordResponse>(
      'GetBillingRecord',
      async (req, ctx) => {
        const view = await billing.getRecord(ctx, toId(req.id, 'id'));
        return { billingRecord: billingRecordToPb(view, currency) };
      },
    ),

    listBillingRecords: unary<pb.ListBillingRecordsRequest, pb.ListBillingRecordsResponse>(
      'ListBillingRecords',
      async (req, ctx) => {
        const filter = { userId: userIdFilter(req.userId), status: parseBillingRecordStatusFilter(req.status) };
        const page = await billing.listRecords(ctx, filter, pageRequest(req));
        return {
          billingRecords: page.items.map((view) => billingRecordToPb(view, currency)),
          nextPageToken: page.nextPageToken,
        };
      },
    ),

    processBillingRecord: unary<pb.ProcessBillingRecordRequest, pb.ProcessBillingRecordResponse>(
      'ProcessBillingRecord',
      async (req, ctx) => {
        const result = await billing.processRecord(ctx, toId(req.id, 'id'));
        return { billingRecord: billingRecordToPb(result, currency), outcome: chargeOutcomeToPb(result.outcome) };
      },
    ),

    listUsageLogs: unary<pb.ListUsageLogsRequest, pb.ListUsageLogsResponse>('ListUsageLogs', async (req, ctx) => {
      const filter = {
        userId: userIdFilter(req.userId),
        status: parseUsageLogStatusFilter(req.status),
        source: parseUsageSourceFilter(req.source),
        from: req.startTime ?? null,
        to: req.endTime ?? null,
      };
      const page = await usage.listUsageLogs(ctx, filter, pageRequest(req));
      return { usageLogs: page.items.map(usageLogToPb), nextPageToken: page.nextPageToken };
    }),
  };
}
