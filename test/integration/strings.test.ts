/**
 * Control characters in request strings: EVERY string field of every billing
 * RPC, found by walking the request types in the descriptor set (not a list
 * kept by hand), is sent with a NUL in it. Each call is INVALID_ARGUMENT with
 * reason INVALID_CHARACTERS and `billing-error-field` naming the field as in
 * the proto (a nested one as `amount.currency_code`), and nothing is written.
 * (Before, SQLite cut the statement at the NUL and the call was INTERNAL.)
 *
 * Requests are encoded with proto-loader from the descriptor set, with the
 * proto's own field names, and every other field holds a value the RPC
 * accepts, so only the bad string can stop the call.
 */
import * as fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { DESCRIPTOR_SET_PATH } from '../../src/grpc/reflection';
import { call, money, reasonOf, startTestApp, type TestApp } from '../helpers/harness';

interface Field {
  name: string;
  type: string;
  typeName: string;
}
interface MessageDefinition {
  type: { field: Field[] };
}

const definition = protoLoader.loadFileDescriptorSetFromBuffer(fs.readFileSync(DESCRIPTOR_SET_PATH), {
  keepCase: true,
  longs: String,
  enums: String,
});
const SERVICES = ['billing.v1.UserService', 'billing.v1.WalletService', 'billing.v1.BillingService', 'billing.v1.JobService'];

interface Rpc {
  path: string;
  method: protoLoader.MethodDefinition<object, object>;
}
const RPCS: Rpc[] = SERVICES.flatMap((service) =>
  Object.values(definition[service] as protoLoader.ServiceDefinition).map((method) => ({ path: method.path, method })),
);

/** A field's message type: absolute (`.pkg.Type`) or relative to the package, as proto-loader leaves it. */
function messageOf(typeName: string): MessageDefinition {
  const found = typeName.startsWith('.') ? definition[typeName.slice(1)] : (definition[`billing.v1.${typeName}`] ?? definition[typeName]);
  if (!found) throw new Error(`unknown message type ${typeName}`);
  return found as unknown as MessageDefinition;
}

/** The proto paths of every string field of a message, nested messages included (`amount.currency_code`). */
function stringPaths(message: MessageDefinition, prefix = '', depth = 0): string[] {
  if (depth > 5) return [];
  return message.type.field.flatMap((f) => {
    if (f.type === 'TYPE_STRING') return [prefix + f.name];
    if (f.type === 'TYPE_MESSAGE') return stringPaths(messageOf(f.typeName), `${prefix}${f.name}.`, depth + 1);
    return [];
  });
}

const CASES: [string, string][] = RPCS.flatMap(({ path, method }) =>
  stringPaths(method.requestType as unknown as MessageDefinition).map((field): [string, string] => [path, field]),
);

describe('control characters in request strings', () => {
  let t: TestApp;
  let raw: grpc.Client;
  let userId: bigint;
  let seq = 0;

  /** A request every field of which the RPC accepts; ids point at the existing user. */
  function validRequest(message: MessageDefinition): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const f of message.type.field) {
      if (f.type === 'TYPE_MESSAGE') out[f.name] = f.name === 'amount' ? { currency_code: 'USD', units: '1', nanos: 0 } : validRequest(messageOf(f.typeName));
      else if (f.type === 'TYPE_STRING') out[f.name] = f.name === 'email' ? `s${++seq}@example.com` : ['page_token', 'request_id'].includes(f.name) ? '' : 'fine';
      else if (f.name === 'id' || f.name === 'user_id') out[f.name] = String(userId);
    }
    return out;
  }

  function withValue(request: Record<string, unknown>, path: string, value: string): Record<string, unknown> {
    const [head, ...rest] = path.split('.');
    if (rest.length === 0) return { ...request, [head]: value };
    return { ...request, [head]: withValue((request[head] as Record<string, unknown>) ?? {}, rest.join('.'), value) };
  }

  type Outcome = { code: string; reason?: string; field?: string };
  function send(rpc: Rpc, request: Record<string, unknown>): Promise<Outcome> {
    return new Promise((resolve) => {
      raw.makeUnaryRequest(
        rpc.path,
        (r: object) => rpc.method.requestSerialize(r),
        (b: Buffer) => b,
        request,
        new grpc.Metadata(),
        { deadline: Date.now() + 10_000 },
        (err) => {
          if (!err) return resolve({ code: 'OK' });
          const field = err.metadata?.get('billing-error-field')[0];
          resolve({ code: grpc.status[err.code], reason: reasonOf(err), ...(field === undefined ? {} : { field: String(field) }) });
        },
      );
    });
  }

  /** What the RPCs show of everything the string-taking RPCs could write: users, the wallet, records, job runs. */
  async function visibleState(): Promise<unknown> {
    return {
      users: (await call(t.users, 'listUsers', { pageSize: 500, pageToken: '', status: 0 })).users,
      transactions: (await call(t.wallets, 'listWalletTransactions', { userId, pageSize: 500, pageToken: '' })).transactions,
      records: (await call(t.billing, 'listBillingRecords', { userId: 0n, status: 0, pageSize: 500, pageToken: '' })).billingRecords,
      jobRuns: (await call(t.jobs, 'listJobRuns', { pageSize: 500, pageToken: '' })).jobRuns,
    };
  }

  beforeAll(async () => {
    t = await startTestApp({}, { scheduler: false });
    userId = (await call(t.users, 'createUser', { email: 'owner@example.com', name: 'Owner', requestId: '' })).user!.id;
    await call(t.wallets, 'addFunds', { userId, amount: money('10'), requestId: 'seed' });
    raw = new grpc.Client(t.address, grpc.credentials.createInsecure());
  });

  afterAll(async () => {
    raw?.close();
    await t?.stop();
  });

  it('finds the string fields to test in the descriptor set (at least the known ones)', () => {
    const fields = CASES.map(([p, f]) => `${p.split('/')[2]}.${f}`);
    expect(fields).toEqual(
      expect.arrayContaining([
        'CreateUser.email',
        'CreateUser.name',
        'CreateUser.request_id',
        'UpdateUser.name',
        'SuspendUser.reason',
        'AddFunds.amount.currency_code',
        'CreateBillingRecord.description',
        'ListJobRuns.page_token',
      ]),
    );
  });

  it.each(CASES)('%s with a NUL in %s is INVALID_ARGUMENT/INVALID_CHARACTERS naming the field, and writes nothing', async (path, field) => {
    const rpc = RPCS.find((r) => r.path === path)!;
    const base = validRequest(rpc.method.requestType as unknown as MessageDefinition);
    const before = await visibleState();
    const got = await send(rpc, withValue(base, field, 'bad\u0000value'));
    expect(got).toEqual({ code: 'INVALID_ARGUMENT', reason: 'INVALID_CHARACTERS', field });
    expect(await visibleState()).toEqual(before);
  });

  it.each([
    ['BEL', '\u0007'],
    ['ESC (terminal escapes)', '\u001b[31m'],
    ['DEL', '\u007f'],
    ['a C1 control (NEL)', '\u0085'],
    ['a lone NUL', '\u0000'],
  ])('refuses %s too', async (_what, bad) => {
    const got = await send(RPCS.find((r) => r.path === '/billing.v1.UserService/CreateUser')!, {
      email: `c${++seq}@example.com`,
      name: `a${bad}b`,
      request_id: '',
    });
    expect(got).toEqual({ code: 'INVALID_ARGUMENT', reason: 'INVALID_CHARACTERS', field: 'name' });
  });

  it('accepts tab, line feed and carriage return, and any other Unicode text', async () => {
    const rpc = RPCS.find((r) => r.path === '/billing.v1.UserService/SuspendUser')!;
    const target = (await call(t.users, 'createUser', { email: `u${++seq}@example.com`, name: 'Zoë 🚀 Å\u00a0B', requestId: '' })).user!;
    expect(target.name).toBe('Zoë 🚀 Å\u00a0B');
    expect(await send(rpc, { id: String(target.id), reason: 'line 1\r\nline 2\tend' })).toEqual({ code: 'OK' });
    expect((await call(t.users, 'getUser', { id: target.id })).user!.suspensionReason).toBe('line 1\r\nline 2\tend');
  });
});
