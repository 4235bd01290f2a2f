/** EventService: protobuf in, one EventsService call, protobuf out (WatchEvents through the server-stream adapter). */
import type { EventQuery, EventsService } from '../events/events.service';
import type { StoredEvent } from '../events/events.types';
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
  // A live event goes to every watcher as the same object: converted once (gone with the event).
  const converted = new WeakMap<StoredEvent, pb.WatchEventsResponse>();
  const responseOf = (event: StoredEvent): pb.WatchEventsResponse => {
    let response = converted.get(event);
    if (!response) {
      response = { event: eventToPb(event, currency) };
      converted.set(event, response);
    }
    return response;
  };
  return {
    watchEvents: serverStream<pb.WatchEventsRequest, pb.WatchEventsResponse>('WatchEvents', (req, ctx) =>
      events.watch(queryOf(req), (event, signal) => ctx.send(responseOf(event), signal), ctx.signal),
    ),

    listEvents: unary<pb.ListEventsRequest, pb.ListEventsResponse>('ListEvents', async (req) => {
      const page = await events.list({ ...queryOf(req), pageSize: req.pageSize });
      return { events: page.events.map((e) => eventToPb(e, currency)), nextCursor: page.nextCursor };
    }),
  };
}
