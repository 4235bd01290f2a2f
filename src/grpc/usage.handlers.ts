/** UsageService: protobuf in, one UsageService call, protobuf out. */
import type { UsageEventInput, UsageService } from '../usage/usage.service';
import * as pb from '../../generated/billing/v1/usage_service';
import type { Bidi, Unary } from './adapter';
import { parseGroupBy, usageEventResultToPb, usageSummaryRowToPb, userIdFilter } from './convert';

export interface UsageHandlersDeps {
  unary: Unary;
  bidi: Bidi;
  usage: UsageService;
  /** The deployment's currency (ISO 4217). */
  currency: string;
}

/** Batches of one stream worked on at once (see createBidi). */
const STREAM_WINDOW = 4;
/** Each event is validated on its own (a bad one is REJECTED with its reason; the rest of its batch goes on). */
const EVENTS = ['events'];

const eventOf = (e: pb.UsageEvent): UsageEventInput => ({ id: e.id, userId: e.userId, service: e.service, quantity: e.quantity, time: e.time });

export function createUsageHandlers({ unary, bidi, usage, currency }: UsageHandlersDeps): pb.UsageServiceServer {
  return {
    recordUsage: unary<pb.RecordUsageRequest, pb.RecordUsageResponse>(
      'RecordUsage',
      async (req, ctx) => ({ results: (await usage.recordUsage(ctx, req.events.map(eventOf))).map(usageEventResultToPb) }),
      { ownRules: EVENTS },
    ),

    streamUsage: bidi<pb.StreamUsageRequest, pb.StreamUsageResponse>(
      'StreamUsage',
      // Each batch is written after the one before it has been (its results reflect the stream's order: an id sent
      // in two batches is ACCEPTED in the first), while the next ones are read and validated meanwhile.
      async (req, ctx, sequence, previous) => ({
        batchId: req.batchId,
        sequence: BigInt(sequence),
        results: (await usage.recordUsage(ctx, req.events.map(eventOf), { after: previous })).map(usageEventResultToPb),
      }),
      { window: STREAM_WINDOW, ownRules: EVENTS },
    ),

    getUsageSummary: unary<pb.GetUsageSummaryRequest, pb.GetUsageSummaryResponse>('GetUsageSummary', async (req, ctx) => {
      const rows = await usage.summary(ctx, {
        userId: userIdFilter(req.userId),
        service: req.service === '' ? null : req.service,
        from: req.startTime,
        to: req.endTime,
        groupBy: parseGroupBy(req.groupBy),
      });
      return { rows: rows.map((r) => usageSummaryRowToPb(r, currency)) };
    }),
  };
}

