import type { Database } from '../../src/db/database';
import { createEventsRepository } from '../../src/events/events.repository';
import type { EventType, StoredEvent } from '../../src/events/events.types';

/** Every committed event (or those of `types`), oldest first, read page by page through the events' door. */
export async function allEvents(db: Database, types?: readonly EventType[]): Promise<StoredEvent[]> {
  const events = createEventsRepository(db);
  const out: StoredEvent[] = [];
  for (let afterId = 0; ; ) {
    const page = await events.list({ afterId, types }, 1000);
    out.push(...page);
    if (page.length < 1000) return out;
    afterId = page[page.length - 1].id;
  }
}

/** How many events of each type, and whether their ids strictly increase in the order they are listed. */
export async function eventSummary(db: Database): Promise<{ byType: Partial<Record<EventType, number>>; increasing: boolean }> {
  const list = await allEvents(db);
  const byType: Partial<Record<EventType, number>> = {};
  for (const e of list) byType[e.type] = (byType[e.type] ?? 0) + 1;
  return { byType, increasing: list.every((e, i) => i === 0 || e.id > list[i - 1].id) };
}
