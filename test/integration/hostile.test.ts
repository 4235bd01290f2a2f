/**
 * Hostile input, generated with fast-check against the running server: absurd
 * money, ids, strings, page sizes, page tokens and enum numbers, and protobuf
 * bytes that do not decode at all. Each is refused with the right status and
 * writes nothing; the server keeps serving.
 *
 * What grpc-js does with a request it cannot deserialize (checked in
 * node_modules/@grpc/grpc-js/build/src/server-interceptors.js): the handler
 * never runs and the call ends with INTERNAL "Error deserializing request".
 * So undecodable bytes get exactly INTERNAL, without a billing reason.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { BinaryWriter, WireType } from '@bufbuild/protobuf/wire';
import fc from 'fast-check';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import type * as moneyPb from '../../generated/billing/v1/money';
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import { checkInvariants } from '../../src/ops/invariants';
import { usageIdentity, rejectedIdentity } from '../../src/usage/entries';
import { readUsageFile, UsageFileError } from '../../src/usage/parser';
import { validateEntry } from '../../src/usage/entries';
import { call, money, reasonOf, startTestApp, type TestApp } from '../helpers/harness';

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;
const INT32_MIN = -(2 ** 31);
const INT32_MAX = 2 ** 31 - 1;
const NO_SUCH_USER = 1_000_000n;
const KB500 = 500 * 1024;

type Outcome = { code: string; reason?: string; field?: string };

/** The status of a finished call: OK, or its code with the billing reason and field trailers. */
function outcomeOf(p: Promise<unknown>): Promise<Outcome> {
  return p.then(
    () => ({ code: 'OK' }),
    (err: grpc.ServiceError) => {
      const field = err.metadata?.get('billing-error-field')[0];
      return { code: grpc.status[err.code], reason: reasonOf(err), ...(field === undefined ? {} : { field: String(field) }) };
    },
  );
}

/** What moneyToMicros + "amount > 0" accept, written independently: the micros, or null when refused. */
function acceptedMicros(m: moneyPb.Money): bigint | null {
  const currency = m.currencyCode.trim().toUpperCase();
  if (currency !== '' && currency !== 'USD') return null;
  if (m.nanos <= -1e9 || m.nanos >= 1e9) return null;
  if ((m.units > 0n && m.nanos < 0) || (m.units < 0n && m.nanos > 0)) return null;
  if (m.nanos % 1000 !== 0) return null;
  const micros = m.units * 1_000_000n + BigInt(m.nanos / 1000);
  return micros > 0n && micros <= INT64_MAX ? micros : null;
}

function varint(value: bigint): number[] {
  const out: number[] = [];
  let v = BigInt.asUintN(70, value);
  do {
    const byte = Number(v & 0x7fn);
    v >>= 7n;
    out.push(v > 0n ? byte | 0x80 : byte);
  } while (v > 0n);
  return out;
}

/** AddFundsRequest { user_id = 1; amount = 2 (Money { currency_code = 1; units = 2; nanos = 3 }); } with raw units bytes. */
function addFundsWithRawUnits(userId: bigint, unitsVarint: number[]): Uint8Array {
  const money = [0x0a, 3, ...Buffer.from('USD'), 0x10, ...unitsVarint];
  return Uint8Array.from([0x08, ...varint(userId), 0x12, money.length, ...money]);
}

describe('hostile input against the running server', () => {
  let t: TestApp;
  let raw: grpc.Client;
  let userId: bigint;
  const existingUsers = new Set<bigint>();
  const existingRecords = new Set<bigint>();

  const TABLES = ['users', 'wallets', 'wallet_transactions', 'billing_records', 'line_items', 'usage_logs', 'idempotency_keys', 'job_runs'];
  async function rowCounts(): Promise<Record<string, number>> {
    const em = t.app.db.fork();
    const out: Record<string, number> = {};
    for (const table of TABLES) out[table] = Number((await em.execute<{ n: unknown }[]>(`select count(*) as n from ${table}`))[0].n);
    const [w] = await em.execute<{ b: string }[]>(`select cast(coalesce(sum(balance), 0) as text) as b from wallets`);
    out.balance = Number(w.b);
    return out;
  }

  /** Runs `body` and asserts that no table gained or lost a row and no balance moved. */
  async function writesNothing(body: () => Promise<void>): Promise<void> {
    const before = await rowCounts();
    await body();
    expect(await rowCounts()).toEqual(before);
  }

  function rawCall(method: string, bytes: Uint8Array): Promise<Outcome & { details: string }> {
    return new Promise((resolve) => {
      raw.makeUnaryRequest(
        method,
        (x: Buffer) => x,
        (x: Buffer) => x,
        Buffer.from(bytes),
        new grpc.Metadata(),
        { deadline: Date.now() + 10_000 },
        (err) => resolve(err ? { code: grpc.status[err.code], reason: reasonOf(err), details: err.details } : { code: 'OK', details: '' }),
      );
    });
  }

  beforeAll(async () => {
    t = await startTestApp({}, { scheduler: false });
    for (let i = 0; i < 3; i++) {
      const { user } = await call(t.users, 'createUser', { email: `h${i}@example.com`, name: `H${i}`, requestId: '' });
      existingUsers.add(user!.id);
    }
    userId = [...existingUsers][0];
    await call(t.wallets, 'addFunds', { userId, amount: money('10'), requestId: 'h-fund' });
    const { billingRecord } = await call(t.billing, 'createBillingRecord', { userId, amount: money('1'), description: 'h', requestId: '' });
    existingRecords.add(billingRecord!.id);
    raw = new grpc.Client(`127.0.0.1:${t.port}`, grpc.credentials.createInsecure());
  });

  afterAll(async () => {
    raw?.close();
    await t?.stop();
  });

  afterEach(async () => {
    // Whatever the last test threw at it, the server still answers.
    const { user } = await call(t.users, 'getUser', { id: userId });
    expect(user!.id).toBe(userId);
  });

  describe('absurd Money', () => {
    const moneyArb = fc.record({
      currencyCode: fc.constantFrom('', 'USD', 'usd', ' USD ', 'EUR', 'US', 'USDX', '\u0000', '💵'),
      units: fc.oneof(
        fc.bigInt({ min: INT64_MIN, max: INT64_MAX }),
        fc.constantFrom(INT64_MIN, INT64_MAX, 9_223_372_036_855n, 9_223_372_036_854n, -1n, 0n, 1n),
      ),
      nanos: fc.oneof(
        fc.integer({ min: INT32_MIN, max: INT32_MAX }),
        fc.constantFrom(1_000_000_000, -1_000_000_000, 999_999_999, 999_999_000, 775_807_000, 775_808_000, -999_999_000, 1, -1, 500, 0),
      ),
    });

    it('AddFunds and CreateBillingRecord refuse every Money the rules refuse (INVALID_ARGUMENT on amount), and accept the rest', async () => {
      await writesNothing(async () => {
        await fc.assert(
          fc.asyncProperty(moneyArb, async (amount) => {
            const valid = acceptedMicros(amount) !== null;
            // A control character (the NUL) is refused before any rule about money, for every string field.
            const control = /[\u0000-\u001f]/.test(amount.currencyCode);
            // A valid amount goes to a user that does not exist, so that nothing is written either way.
            const target = valid ? NO_SUCH_USER : userId;
            const expected = valid
              ? { code: 'NOT_FOUND', reason: 'USER_NOT_FOUND' }
              : control
                ? { code: 'INVALID_ARGUMENT', reason: 'INVALID_CHARACTERS', field: 'amount.currency_code' }
                : { code: 'INVALID_ARGUMENT', field: 'amount' };
            const add = await outcomeOf(call(t.wallets, 'addFunds', { userId: target, amount, requestId: '' }));
            const create = await outcomeOf(
              call(t.billing, 'createBillingRecord', { userId: target, amount, description: 'fuzz', requestId: '' }),
            );
            for (const got of [add, create]) {
              expect(got).toMatchObject(expected);
              if (!valid && !control) {
                expect(['CURRENCY_MISMATCH', 'INVALID_AMOUNT', 'AMOUNT_TOO_PRECISE', 'AMOUNT_OUT_OF_RANGE', 'NON_POSITIVE_AMOUNT']).toContain(got.reason);
              }
            }
          }),
          { numRuns: 150 },
        );
      });
    });

    it('units beyond int64 on the wire: wrapped values are INVALID_ARGUMENT, an over-long varint is INTERNAL (undecodable)', async () => {
      const cases: [string, number[]][] = [
        ['2^64 - 1 (wraps to -1)', varint(2n ** 64n - 1n)],
        ['2^63 (wraps to INT64_MIN)', varint(2n ** 63n)],
        ['INT64_MAX (micros overflow)', varint(INT64_MAX)],
        ['10 bytes with bits past 64', [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]],
        ['an 11-byte varint', [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]],
      ];
      await writesNothing(async () => {
        for (const [name, units] of cases) {
          const bytes = addFundsWithRawUnits(userId, units);
          let expected: string;
          try {
            const decoded = walletPb.AddFundsRequest.decode(bytes);
            expect({ name, accepted: acceptedMicros(decoded.amount!) }).toEqual({ name, accepted: null });
            expected = 'INVALID_ARGUMENT';
          } catch {
            expected = 'INTERNAL';
          }
          const got = await rawCall('/billing.v1.WalletService/AddFunds', bytes);
          expect({ name, code: got.code }).toEqual({ name, code: expected });
          if (expected === 'INTERNAL') expect({ name, details: got.details, reason: got.reason }).toEqual({ name, details: 'Error deserializing request', reason: undefined });
        }
      });
    });
  });

  describe('absurd ids', () => {
    const badId = fc.oneof(
      fc.constant(0n),
      fc.bigInt({ min: INT64_MIN, max: -1n }),
      fc.bigInt({ min: 2n ** 53n, max: INT64_MAX }),
      fc.constantFrom(-1n, INT64_MIN, 2n ** 53n, 2n ** 53n + 1n, INT64_MAX),
    );

    it('every id-taking RPC answers INVALID_ARGUMENT INVALID_ID for 0, negatives and ids beyond 2^53', async () => {
      await writesNothing(async () => {
        await fc.assert(
          fc.asyncProperty(badId, async (id) => {
            const calls: [string, () => Promise<unknown>][] = [
              ['GetUser', () => call(t.users, 'getUser', { id })],
              ['UpdateUser', () => call(t.users, 'updateUser', { id, name: 'x' })],
              ['DeleteUser', () => call(t.users, 'deleteUser', { id })],
              ['SuspendUser', () => call(t.users, 'suspendUser', { id, reason: 'r' })],
              ['ActivateUser', () => call(t.users, 'activateUser', { id })],
              ['GetWallet', () => call(t.wallets, 'getWallet', { userId: id })],
              ['GetBalance', () => call(t.wallets, 'getBalance', { userId: id })],
              ['AddFunds', () => call(t.wallets, 'addFunds', { userId: id, amount: money('1'), requestId: '' })],
              ['ListWalletTransactions', () => call(t.wallets, 'listWalletTransactions', { userId: id, pageSize: 0, pageToken: '' })],
              ['CreateBillingRecord', () => call(t.billing, 'createBillingRecord', { userId: id, amount: money('1'), description: 'd', requestId: '' })],
              ['GetBillingRecord', () => call(t.billing, 'getBillingRecord', { id })],
              ['ProcessBillingRecord', () => call(t.billing, 'processBillingRecord', { id })],
              ['ListBillingRecords', () => call(t.billing, 'listBillingRecords', { userId: id, status: 0, pageSize: 0, pageToken: '' })],
              ['ListUsageLogs', () => call(t.billing, 'listUsageLogs', { source: 0, userId: id, status: 0, pageSize: 0, pageToken: '' })],
            ];
            for (const [rpc, send] of calls) {
              const p = send();
              // ListBillingRecords / ListUsageLogs take user_id 0 as "every user", which badId never is for them.
              if (id === 0n && (rpc === 'ListBillingRecords' || rpc === 'ListUsageLogs')) {
                expect({ rpc, ...(await outcomeOf(p)) }).toEqual({ rpc, code: 'OK' });
                continue;
              }
              expect({ rpc, ...(await outcomeOf(p)) }).toMatchObject({ rpc, code: 'INVALID_ARGUMENT', reason: 'INVALID_ID' });
            }
          }),
          { numRuns: 40 },
        );
      });
    });
  });

  describe('huge strings (~500 KB, under the message size limit)', () => {
    const huge = 'x'.repeat(KB500);

    it('are refused field by field and write nothing', async () => {
      await writesNothing(async () => {
        const cases: [string, () => Promise<unknown>, string, string][] = [
          ['CreateUser email', () => call(t.users, 'createUser', { email: `${huge}@example.com`, name: 'n', requestId: '' }), 'email', 'INVALID_EMAIL'],
          ['CreateUser name', () => call(t.users, 'createUser', { email: 'big@example.com', name: huge, requestId: '' }), 'name', 'INVALID_NAME'],
          ['CreateUser request_id', () => call(t.users, 'createUser', { email: 'big@example.com', name: 'n', requestId: huge }), 'request_id', 'INVALID_REQUEST_ID'],
          ['UpdateUser name', () => call(t.users, 'updateUser', { id: userId, name: huge }), 'name', 'INVALID_NAME'],
          ['UpdateUser email', () => call(t.users, 'updateUser', { id: userId, email: huge }), 'email', 'INVALID_EMAIL'],
          ['SuspendUser reason', () => call(t.users, 'suspendUser', { id: userId, reason: huge }), 'reason', 'INVALID_REASON'],
          ['AddFunds request_id', () => call(t.wallets, 'addFunds', { userId, amount: money('1'), requestId: huge }), 'request_id', 'INVALID_REQUEST_ID'],
          [
            'AddFunds currency_code',
            () => call(t.wallets, 'addFunds', { userId, amount: { currencyCode: huge, units: 1n, nanos: 0 }, requestId: '' }),
            'amount',
            'CURRENCY_MISMATCH',
          ],
          [
            'CreateBillingRecord description',
            () => call(t.billing, 'createBillingRecord', { userId, amount: money('1'), description: huge, requestId: '' }),
            'description',
            'INVALID_DESCRIPTION',
          ],
          ['ListUsers page_token', () => call(t.users, 'listUsers', { pageSize: 0, pageToken: huge, status: 0 }), 'page_token', 'INVALID_PAGE_TOKEN'],
        ];
        for (const [name, send, field, reason] of cases) {
          expect({ name, ...(await outcomeOf(send())) }).toEqual({ name, code: 'INVALID_ARGUMENT', reason, field });
        }
      });
    });
  });

  describe('paging and enums', () => {
    type Lister = (pageSize: number, pageToken: string) => Promise<unknown>;
    const listers: [string, Lister][] = [
      ['ListUsers', (pageSize, pageToken) => call(t.users, 'listUsers', { pageSize, pageToken, status: 0 })],
      ['ListWalletTransactions', (pageSize, pageToken) => call(t.wallets, 'listWalletTransactions', { userId, pageSize, pageToken })],
      ['ListBillingRecords', (pageSize, pageToken) => call(t.billing, 'listBillingRecords', { userId: 0n, status: 0, pageSize, pageToken })],
      ['ListUsageLogs', (pageSize, pageToken) => call(t.billing, 'listUsageLogs', { source: 0, userId: 0n, status: 0, pageSize, pageToken })],
      ['ListJobRuns', (pageSize, pageToken) => call(t.jobs, 'listJobRuns', { pageSize, pageToken })],
    ];

    it('page_size 2^31-1 is served as the largest page; negative sizes are INVALID_PAGE_SIZE', async () => {
      const { users } = await call(t.users, 'listUsers', { pageSize: INT32_MAX, pageToken: '', status: 0 });
      expect(users.length).toBe(existingUsers.size);
      await writesNothing(async () => {
        await fc.assert(
          fc.asyncProperty(fc.oneof(fc.constant(-1), fc.constant(INT32_MIN), fc.integer({ min: INT32_MIN, max: -1 })), async (size) => {
            for (const [rpc, list] of listers) {
              expect({ rpc, ...(await outcomeOf(list(size, ''))) }).toEqual({ rpc, code: 'INVALID_ARGUMENT', reason: 'INVALID_PAGE_SIZE', field: 'page_size' });
              expect({ rpc, ...(await outcomeOf(list(INT32_MAX, ''))) }).toEqual({ rpc, code: 'OK' });
            }
          }),
          { numRuns: 20 },
        );
      });
    });

    it('garbage page tokens, and tokens issued for another filter, are INVALID_PAGE_TOKEN', async () => {
      const first = await call(t.users, 'listUsers', { pageSize: 1, pageToken: '', status: 0 });
      expect(first.nextPageToken).not.toBe('');
      expect(
        await outcomeOf(call(t.users, 'listUsers', { pageSize: 1, pageToken: first.nextPageToken, status: userPb.UserStatus.USER_STATUS_ACTIVE })),
      ).toMatchObject({ code: 'INVALID_ARGUMENT', reason: 'INVALID_PAGE_TOKEN' });
      const token = fc.oneof(
        fc.string({ minLength: 1, maxLength: 200 }),
        fc.base64String({ minLength: 1, maxLength: 200 }),
        fc.jsonValue().map((v) => Buffer.from(JSON.stringify(v) ?? 'null').toString('base64url')),
        fc.record({ a: fc.oneof(fc.integer(), fc.double(), fc.string()), f: fc.string() }).map((v) => Buffer.from(JSON.stringify(v)).toString('base64url')),
      );
      await writesNothing(async () => {
        await fc.assert(
          fc.asyncProperty(token, async (pageToken) => {
            for (const [rpc, list] of listers) {
              expect({ rpc, ...(await outcomeOf(list(0, pageToken))) }).toEqual({ rpc, code: 'INVALID_ARGUMENT', reason: 'INVALID_PAGE_TOKEN', field: 'page_token' });
            }
          }),
          { numRuns: 60 },
        );
      });
    });

    it('enum numbers out of range are INVALID_ENUM', async () => {
      const unknown = (known: number[]) => fc.integer({ min: INT32_MIN, max: INT32_MAX }).filter((v) => !known.includes(v));
      await writesNothing(async () => {
        await fc.assert(
          fc.asyncProperty(unknown([0, 1, 2]), unknown([0, 1, 2, 3]), async (userStatus, recordOrUsageStatus) => {
            const got = [
              await outcomeOf(call(t.users, 'listUsers', { pageSize: 0, pageToken: '', status: userStatus as userPb.UserStatus })),
              await outcomeOf(
                call(t.billing, 'listBillingRecords', { userId: 0n, status: recordOrUsageStatus as billingPb.BillingRecordStatus, pageSize: 0, pageToken: '' }),
              ),
              await outcomeOf(
                call(t.billing, 'listUsageLogs', { source: 0, userId: 0n, status: recordOrUsageStatus as billingPb.UsageLogStatus, pageSize: 0, pageToken: '' }),
              ),
            ];
            for (const g of got) expect(g).toEqual({ code: 'INVALID_ARGUMENT', reason: 'INVALID_ENUM', field: 'status' });
          }),
          { numRuns: 40 },
        );
      });
    });
  });

  describe('malformed protobuf bytes (raw grpc-js client)', () => {
    type Target = {
      method: string;
      decode: (b: Uint8Array) => unknown;
      /** True when the decoded request might be valid and so might legitimately write or succeed. */
      mightSucceed: (req: never) => boolean;
      valid: Uint8Array;
    };
    const targets: Target[] = [
      {
        method: '/billing.v1.WalletService/AddFunds',
        decode: (b) => walletPb.AddFundsRequest.decode(b),
        mightSucceed: (r: walletPb.AddFundsRequest) => existingUsers.has(r.userId),
        valid: walletPb.AddFundsRequest.encode({ userId: 1n, amount: { currencyCode: 'USD', units: 5n, nanos: 0 }, requestId: 'raw' }).finish(),
      },
      {
        method: '/billing.v1.UserService/CreateUser',
        decode: (b) => userPb.CreateUserRequest.decode(b),
        mightSucceed: (r: userPb.CreateUserRequest) => r.email.includes('@'),
        valid: userPb.CreateUserRequest.encode({ email: 'raw@example.com', name: 'Raw', requestId: 'raw' }).finish(),
      },
      {
        method: '/billing.v1.BillingService/CreateBillingRecord',
        decode: (b) => billingPb.CreateBillingRecordRequest.decode(b),
        mightSucceed: (r: billingPb.CreateBillingRecordRequest) => existingUsers.has(r.userId),
        valid: billingPb.CreateBillingRecordRequest.encode({
          userId: 1n,
          amount: { currencyCode: 'USD', units: 1n, nanos: 0 },
          description: 'raw',
          requestId: 'raw',
        }).finish(),
      },
      {
        method: '/billing.v1.BillingService/ProcessBillingRecord',
        decode: (b) => billingPb.ProcessBillingRecordRequest.decode(b),
        mightSucceed: (r: billingPb.ProcessBillingRecordRequest) => existingRecords.has(r.id),
        valid: billingPb.ProcessBillingRecordRequest.encode({ id: 1n }).finish(),
      },
      {
        method: '/billing.v1.UserService/GetUser',
        decode: (b) => userPb.GetUserRequest.decode(b),
        mightSucceed: (r: userPb.GetUserRequest) => existingUsers.has(r.id),
        valid: userPb.GetUserRequest.encode({ id: 1n }).finish(),
      },
    ];

    const malformed = (valid: Uint8Array) =>
      fc.oneof(
        fc.uint8Array({ maxLength: 80 }),
        // A valid request cut short.
        fc.integer({ min: 1, max: Math.max(1, valid.length - 1) }).map((n) => valid.slice(0, n)),
        // A valid request followed by a field with wire type 6 or 7 (there are none).
        fc.tuple(fc.integer({ min: 1, max: 30 }), fc.constantFrom(6, 7), fc.uint8Array({ maxLength: 6 })).map(([field, wire, rest]) =>
          Uint8Array.from([...valid, (field << 3) | wire, ...rest]),
        ),
        // A varint longer than 10 bytes.
        fc.integer({ min: 1, max: 5 }).map((field) => Uint8Array.from([field << 3, ...Array(11).fill(0xff), 0x01])),
        // A length prefix pointing past the end of the message.
        fc.tuple(fc.integer({ min: 1, max: 5 }), fc.integer({ min: 2, max: 100_000 })).map(([field, len]) =>
          Uint8Array.from([(field << 3) | WireType.LengthDelimited, ...varint(BigInt(len)), 0x41]),
        ),
        // Nested Money that is itself garbage.
        fc.uint8Array({ maxLength: 20 }).map((inner) => {
          const w = new BinaryWriter();
          w.tag(1, WireType.Varint).int64(7n);
          w.tag(2, WireType.LengthDelimited).bytes(inner);
          return w.finish();
        }),
      );

    it.each(targets.map((target) => [target.method, target] as const))(
      '%s: undecodable bytes are INTERNAL "Error deserializing request", decodable garbage is refused; nothing is written',
      async (_method, target) => {
        let undecodable = 0;
        await writesNothing(async () => {
          await fc.assert(
            fc.asyncProperty(malformed(target.valid), async (bytes) => {
              let decoded: unknown;
              try {
                decoded = target.decode(bytes);
              } catch {
                decoded = undefined;
              }
              fc.pre(decoded === undefined || !target.mightSucceed(decoded as never));
              const got = await rawCall(target.method, bytes);
              if (decoded === undefined) {
                undecodable++;
                expect({ code: got.code, details: got.details, reason: got.reason }).toEqual({
                  code: 'INTERNAL',
                  details: 'Error deserializing request',
                  reason: undefined,
                });
              } else {
                expect(['INVALID_ARGUMENT', 'NOT_FOUND']).toContain(got.code);
              }
            }),
            { numRuns: 120 },
          );
        });
        expect(undecodable).toBeGreaterThan(10); // the generator does reach the decoder's failure paths
      },
    );
  });
});

describe('usage lines of any shape', () => {
  /** An arbitrary line: text, JSON of any kind, or something shaped like a usage entry with odd values. */
  const field = fc.oneof(
    fc.string({ unit: 'binary', maxLength: 20 }),
    fc.integer(),
    fc.double(),
    fc.bigInt().map((b) => b.toString()),
    fc.constantFrom('1', '-1', '0.1234567', '1e400', '2024-01-15T10:00:00Z', '2999-01-01T00:00:00Z', 'api-calls', 'storage', ' ', ''),
    fc.constant(null),
  );
  const usageLike = fc
    .record(
      { userId: field, service: field, resource: field, quantity: field, timestamp: field, id: field },
      { requiredKeys: [] },
    )
    .map((o) => JSON.stringify(o));
  const line = fc.oneof(
    fc.string({ unit: 'binary', maxLength: 60 }).map((s) => s.replace(/[\n]/g, ' ')),
    fc.jsonValue({ maxDepth: 3 }).map((v) => JSON.stringify(v)),
    usageLike,
    fc.constant('{"userId": 1, "service": "api-calls", "quantity": 1, "timestamp": "2024-01-15T10:00:00Z"}'),
  );
  const usageLines = fc.array(line, { minLength: 1, maxLength: 30 });

  it('parse -> validate -> identity never throws anything but UsageFileError, and gives each entry one stable identity', async () => {
    const dir = fs.mkdtempSync(path.join(require('node:os').tmpdir(), 'usage-fuzz-'));
    try {
      await fc.assert(
        fc.asyncProperty(usageLines, async (lines) => {
          const file = path.join(dir, 'u.ndjson');
          fs.writeFileSync(file, lines.join('\n') + '\n');
          const now = new Date('2026-01-01T00:00:00Z');
          try {
            for await (const batch of readUsageFile(file, { batchSize: 7 })) {
              for (const entry of batch) {
                const identify = () => {
                  const v = validateEntry(entry, now, 300_000);
                  return v.ok ? usageIdentity(v.usage) : rejectedIdentity(entry.raw);
                };
                const first = identify();
                expect(first.identity.length).toBeGreaterThan(0);
                expect(identify()).toEqual(first);
              }
            }
          } catch (err) {
            expect(err).toBeInstanceOf(UsageFileError); // a first line starting with '[' makes it a (broken) JSON array
          }
        }),
        { numRuns: 300 },
      );
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('ProcessLogs over such a file stores each new entry once (rejected, pending or billed) and nothing on a re-run', async () => {
    const t = await startTestApp({}, { scheduler: false });
    try {
      const { user } = await call(t.users, 'createUser', { email: 'fuzz@example.com', name: 'F', requestId: '' });
      await call(t.wallets, 'addFunds', { userId: user!.id, amount: money('1000'), requestId: '' });
      const file = path.join(t.dir, 'usage-logs.json');
      const stored = async () =>
        Number((await t.app.db.fork().execute<{ n: unknown }[]>(`select count(*) as n from usage_logs`))[0].n);
      await fc.assert(
        fc.asyncProperty(usageLines, async (lines) => {
          fs.writeFileSync(file, lines.join('\n') + '\n');
          const before = await stored();
          const run = (await call(t.jobs, 'processLogs', {}, { deadlineMs: 60_000 })).jobRun!;
          if (run.status === jobPb.JobRunStatus.JOB_RUN_STATUS_FAILED) {
            // Only a file that reads as a broken JSON array may fail, and then it bills nothing.
            // (The format is decided by the file's first non-blank character, which may sit on a later line.)
            expect(lines.join('\n').replace(/^\uFEFF/, '').replace(/^[ \t\r\n]+/, '').startsWith('[')).toBe(true);
            expect(run.errorMessage).toContain('unusable');
            expect(await stored()).toBe(before);
            return;
          }
          expect(run.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED);
          expect(run.entriesAccepted + run.entriesRejected + run.entriesDuplicate).toBe(run.entriesRead);
          expect(BigInt((await stored()) - before)).toBe(run.entriesAccepted + run.entriesRejected);
          const again = (await call(t.jobs, 'processLogs', {}, { deadlineMs: 60_000 })).jobRun!;
          expect([again.entriesRead, again.entriesDuplicate, again.entriesAccepted + again.entriesRejected]).toEqual([run.entriesRead, run.entriesRead, 0n]);
        }),
        { numRuns: 25 },
      );
      expect((await checkInvariants(t.app.db)).violations).toEqual([]);
    } finally {
      await t.stop();
    }
  });
});
