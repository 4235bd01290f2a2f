/**
 * UsageService with bearer tokens: a `service` token records usage (unary and
 * stream) and reads summaries; a stream without a token, or with an unknown
 * one, is refused before it records anything.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { bearer, call, startTestApp, type TestApp } from '../helpers/harness';
import { brief, event, recordUsage, UsageStream } from '../helpers/usage-api';

const SERVICE_TOKEN = randomBytes(32).toString('hex');
const OPERATOR_TOKEN = randomBytes(32).toString('hex');

describe('UsageService and roles', () => {
  let t: TestApp;
  let dir: string;
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-usage-auth-'));
    const file = path.join(dir, 'tokens.json');
    fs.writeFileSync(
      file,
      JSON.stringify([
        { name: 'meter', token: SERVICE_TOKEN, role: 'service' },
        { name: 'ops', token: OPERATOR_TOKEN, role: 'operator' },
      ]),
      { mode: 0o600 },
    );
    t = await startTestApp({ AUTH_TOKENS_FILE: file }, { scheduler: false });
  });
  afterEach(async () => {
    await t?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const summary = (metadata: grpc.Metadata) =>
    call(t.usage, 'getUsageSummary', { userId: 0n, service: '', groupBy: 0, startTime: new Date('2026-11-01T00:00:00Z'), endTime: new Date('2026-12-01T00:00:00Z') }, { metadata });

  it('a service token records usage through RecordUsage and StreamUsage and reads the summary', async () => {
    const asService = bearer(SERVICE_TOKEN);
    const { user } = await call(t.users, 'createUser', { email: 'm@example.com', name: 'M', requestId: '' }, { metadata: asService });
    const unary = await recordUsage(t.usage, [event('a-1', user!.id, 'api-calls', '1')], { metadata: asService });
    expect(brief(unary)[0][0]).toBe('ACCEPTED');
    const stream = new UsageStream(t.usage, { metadata: asService });
    await stream.send('s', [event('a-2', user!.id, 'api-calls', '2')]);
    stream.end();
    expect((await stream.done).code).toBe(grpc.status.OK);
    expect(brief(stream.acks[0].results)[0][0]).toBe('ACCEPTED');
    expect((await summary(asService)).rows.map((r) => [r.service, r.quantity])).toEqual([['api-calls', '3']]);
    expect((await summary(bearer(OPERATOR_TOKEN))).rows).toHaveLength(1);
  });

  it('a stream without a token, or with an unknown one, is UNAUTHENTICATED and records nothing', async () => {
    for (const [metadata, reason] of [
      [new grpc.Metadata(), 'MISSING_TOKEN'],
      [bearer(randomBytes(32).toString('hex')), 'INVALID_TOKEN'],
    ] as const) {
      const stream = new UsageStream(t.usage, { metadata });
      await stream.send('s', [event(`x-${reason}`, 1, 'api-calls', '1')]);
      const status = await stream.done;
      expect({ code: grpc.status[status.code], reason: status.metadata.get('billing-error-reason') }).toEqual({ code: 'UNAUTHENTICATED', reason: [reason] });
      expect(stream.acks).toEqual([]);
    }
    expect((await summary(bearer(SERVICE_TOKEN))).rows).toEqual([]);
  });
});
