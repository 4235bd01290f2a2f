/** EventService: protobuf in, one EventsService call, protobuf out (WatchEvents through the server-stream adapter). */
import type { EventQuery, EventsService } from '../events/events.service';
import * as pb from '../../generated/billing/v1/event_service';
import type { ServerStream, Unary } from './adapter';
import { eventToPb, userIdFilter } from './convert';

export interface EventHandlersDeps {
  unary: Unary;
  serverStream: ServerStream;
  events: EventsService;
  /** The deployment's currency (ISO 4217). */
  currency: string;
}

const queryOf = (req: { afterCursor: string; types: string[]; userId: bigint }): EventQuery => ({
  afterCursor: req.afterCursor,
  types: req.types,
  userId: userIdFilter(req.userId),
});

export function createEventHandlers({ unary, serverStream, events, currency }: EventHandlersDeps): pb.EventServiceServer {
  return {
    watchEvents: serverStream<pb.WatchEventsRequest, pb.WatchEventsResponse>('WatchEvents', (req, ctx) =>
      events.watch(queryOf(req), (event, signal) => ctx.send({ event: eventToPb(event, currency) }, signal), ctx.signal),
    ),

    listEvents: unary<pb.ListEventsRequest, pb.ListEventsResponse>('ListEvents', async (req) => {
      const page = await events.list({ ...queryOf(req), pageSize: req.pageSize });
      return { events: page.events.map((e) => eventToPb(e, currency)), nextCursor: page.nextCursor };
    }),
  };
}
