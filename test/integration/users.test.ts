import * as path from 'node:path';
import { Writable } from 'node:stream';
import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { openDatabase } from '../../src/db/database';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as pb from '../../generated/billing/v1/user_service';
import { onPostgres } from '../helpers/database';
import { call, expectGrpcError, money, startTestApp, type TestApp } from '../helpers/harness';

const { INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION } = grpc.status;

let t: TestApp;
let seq = 0;

beforeAll(async () => {
  t = await startTestApp();
});

afterAll(async () => {
  await t?.stop();
});

/** A fresh, unique email for each user a test creates. */
const nextEmail = () => `user${++seq}@example.com`;

async function createUser(overrides: Partial<pb.CreateUserRequest> = {}): Promise<pb.User> {
  const res = await call(t.users, 'createUser', { email: nextEmail(), name: 'Ada Lovelace', requestId: '', ...overrides });
  return res.user!;
}

async function sql<T>(query: string, params: unknown[] = []): Promise<T[]> {
  return t.app.db.fork().execute<T[]>(query, params);
}

async function countUsers(): Promise<number> {
  const rows = await sql<{ n: number }>('select count(*) as n from users');
  return Number(rows[0].n);
}

describe('CreateUser', () => {
  it('creates an ACTIVE user with a normalized email and an empty wallet', async () => {
    const before = Date.now();
    const res = await call(t.users, 'createUser', { email: '  Grace.Hopper@Example.COM ', name: '  Grace Hopper ', requestId: '' });
    const user = res.user!;
    expect(user.id).toBeGreaterThan(0n);
    expect(user.email).toBe('grace.hopper@example.com');
    expect(user.name).toBe('Grace Hopper');
    expect(user.status).toBe(pb.UserStatus.USER_STATUS_ACTIVE);
    expect(user.suspensionReason).toBe('');
    expect(user.createTime!.getTime()).toBeGreaterThanOrEqual(before - 1000);
    expect(user.updateTime!.getTime()).toBe(user.createTime!.getTime());

    const wallet = await call(t.wallets, 'getWallet', { userId: user.id });
    expect(wallet.wallet!.userId).toBe(user.id);
    expect(wallet.wallet!.balance).toEqual({ currencyCode: 'USD', units: 0n, nanos: 0 });
  });

  it.each([
    ['not-an-email', 'INVALID_EMAIL'],
    ['two@@example.com', 'INVALID_EMAIL'],
    ['nodomain@', 'INVALID_EMAIL'],
    ['', 'MISSING_EMAIL'],
    ['   ', 'MISSING_EMAIL'],
  ])('returns INVALID_ARGUMENT for email %j with reason %s and names the field', async (email, reason) => {
    const err = await expectGrpcError(call(t.users, 'createUser', { email, name: 'X', requestId: '' }), INVALID_ARGUMENT, reason);
    expect(err.metadata.get('billing-error-field')).toEqual(['email']);
  });

  it('returns INVALID_ARGUMENT MISSING_NAME when the name is empty or blank', async () => {
    for (const name of ['', '   ']) {
      const err = await expectGrpcError(
        call(t.users, 'createUser', { email: nextEmail(), name, requestId: '' }),
        INVALID_ARGUMENT,
        'MISSING_NAME',
      );
      expect(err.metadata.get('billing-error-field')).toEqual(['name']);
    }
  });

  it('returns INVALID_ARGUMENT INVALID_NAME when the name is longer than 200 characters', async () => {
    await expectGrpcError(
      call(t.users, 'createUser', { email: nextEmail(), name: 'n'.repeat(201), requestId: '' }),
      INVALID_ARGUMENT,
      'INVALID_NAME',
    );
  });

  it('returns INVALID_ARGUMENT INVALID_REQUEST_ID when request_id is longer than 128 characters', async () => {
    await expectGrpcError(
      call(t.users, 'createUser', { email: nextEmail(), name: 'X', requestId: 'r'.repeat(129) }),
      INVALID_ARGUMENT,
      'INVALID_REQUEST_ID',
    );
  });

  it('returns ALREADY_EXISTS EMAIL_TAKEN for an email a live user has, whatever its case', async () => {
    const email = nextEmail();
    await createUser({ email });
    const before = await countUsers();
    await expectGrpcError(createUser({ email: email.toUpperCase() }), ALREADY_EXISTS, 'EMAIL_TAKEN');
    expect(await countUsers()).toBe(before);
  });

  it('replays the first response for the same request_id and request, creating nothing more', async () => {
    const request = { email: nextEmail(), name: 'Idem Potent', requestId: 'create-user-replay-1' };
    const first = await call(t.users, 'createUser', request);
    const before = await countUsers();
    const again = await call(t.users, 'createUser', request);
    expect(again).toEqual(first);
    expect(await countUsers()).toBe(before);
  });

  it('returns ALREADY_EXISTS REQUEST_ID_REUSED when the request_id comes back with a different request', async () => {
    await call(t.users, 'createUser', { email: nextEmail(), name: 'First', requestId: 'create-user-reused-1' });
    const before = await countUsers();
    await expectGrpcError(
      call(t.users, 'createUser', { email: nextEmail(), name: 'Second', requestId: 'create-user-reused-1' }),
      ALREADY_EXISTS,
      'REQUEST_ID_REUSED',
    );
    expect(await countUsers()).toBe(before);
  });
});

describe('GetUser', () => {
  it('returns the user as it was created', async () => {
    const user = await createUser();
    const res = await call(t.users, 'getUser', { id: user.id });
    expect(res.user).toEqual(user);
  });

  it('returns NOT_FOUND USER_NOT_FOUND for an id no user has', async () => {
    await expectGrpcError(call(t.users, 'getUser', { id: 987_654_321n }), NOT_FOUND, 'USER_NOT_FOUND');
  });

  it.each([0n, -1n, 2n ** 53n])('returns INVALID_ARGUMENT INVALID_ID for id %s', async (id) => {
    const err = await expectGrpcError(call(t.users, 'getUser', { id }), INVALID_ARGUMENT, 'INVALID_ID');
    expect(err.metadata.get('billing-error-field')).toEqual(['id']);
  });
});

describe('UpdateUser', () => {
  it('changes only the name when only the name is present', async () => {
    const user = await createUser();
    const res = await call(t.users, 'updateUser', { id: user.id, name: ' New Name ' });
    expect(res.user).toMatchObject({ id: user.id, email: user.email, name: 'New Name' });
    expect(res.user!.updateTime!.getTime()).toBeGreaterThanOrEqual(user.updateTime!.getTime());
    expect((await call(t.users, 'getUser', { id: user.id })).user!.name).toBe('New Name');
  });

  it('changes only the email, normalized, when only the email is present', async () => {
    const user = await createUser();
    const email = nextEmail();
    const res = await call(t.users, 'updateUser', { id: user.id, email: email.toUpperCase() });
    expect(res.user).toMatchObject({ id: user.id, email, name: user.name });
  });

  it('returns ALREADY_EXISTS EMAIL_TAKEN when the new email belongs to another live user', async () => {
    const a = await createUser();
    const b = await createUser();
    await expectGrpcError(call(t.users, 'updateUser', { id: b.id, email: a.email }), ALREADY_EXISTS, 'EMAIL_TAKEN');
    expect((await call(t.users, 'getUser', { id: b.id })).user!.email).toBe(b.email);
  });

  it('accepts the user keeping its own email', async () => {
    const user = await createUser();
    const res = await call(t.users, 'updateUser', { id: user.id, email: user.email, name: 'Same Email' });
    expect(res.user).toMatchObject({ email: user.email, name: 'Same Email' });
  });

  it('returns INVALID_ARGUMENT for a bad email or an empty name', async () => {
    const user = await createUser();
    await expectGrpcError(call(t.users, 'updateUser', { id: user.id, email: 'nope' }), INVALID_ARGUMENT, 'INVALID_EMAIL');
    await expectGrpcError(call(t.users, 'updateUser', { id: user.id, name: '' }), INVALID_ARGUMENT, 'MISSING_NAME');
    expect((await call(t.users, 'getUser', { id: user.id })).user).toEqual(user);
  });

  it('returns NOT_FOUND USER_NOT_FOUND for an unknown user and INVALID_ID for id 0', async () => {
    await expectGrpcError(call(t.users, 'updateUser', { id: 987_654_321n, name: 'X' }), NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(call(t.users, 'updateUser', { id: 0n, name: 'X' }), INVALID_ARGUMENT, 'INVALID_ID');
  });
});

describe('SuspendUser and ActivateUser', () => {
  it('suspends a user with a reason and activates it again, clearing the reason', async () => {
    const user = await createUser();
    const suspended = await call(t.users, 'suspendUser', { id: user.id, reason: ' chargeback ' });
    expect(suspended.user).toMatchObject({ status: pb.UserStatus.USER_STATUS_SUSPENDED, suspensionReason: 'chargeback' });
    expect((await call(t.users, 'getUser', { id: user.id })).user!.status).toBe(pb.UserStatus.USER_STATUS_SUSPENDED);

    const active = await call(t.users, 'activateUser', { id: user.id });
    expect(active.user).toMatchObject({ status: pb.UserStatus.USER_STATUS_ACTIVE, suspensionReason: '' });
  });

  it('returns INVALID_ARGUMENT MISSING_REASON when suspending without a reason', async () => {
    const user = await createUser();
    const err = await expectGrpcError(call(t.users, 'suspendUser', { id: user.id, reason: '  ' }), INVALID_ARGUMENT, 'MISSING_REASON');
    expect(err.metadata.get('billing-error-field')).toEqual(['reason']);
  });

  it('returns NOT_FOUND USER_NOT_FOUND and INVALID_ID for bad targets', async () => {
    await expectGrpcError(call(t.users, 'suspendUser', { id: 987_654_321n, reason: 'x' }), NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(call(t.users, 'activateUser', { id: 987_654_321n }), NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(call(t.users, 'suspendUser', { id: -5n, reason: 'x' }), INVALID_ARGUMENT, 'INVALID_ID');
    await expectGrpcError(call(t.users, 'activateUser', { id: 0n }), INVALID_ARGUMENT, 'INVALID_ID');
  });
});

describe('DeleteUser', () => {
  it('removes a user with a zero balance from GetUser and ListUsers but keeps its ledger rows', async () => {
    const user = await createUser();
    // Give the user history: a credit, then a manual charge that spends it all.
    await call(t.wallets, 'addFunds', { userId: user.id, amount: money('5.00'), requestId: '' });
    const charged = await call(t.billing, 'createBillingRecord', {
      userId: user.id,
      amount: money('5.00'),
      description: 'setup fee',
      requestId: '',
    });
    expect(charged.billingRecord!.status).toBe(billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PAID);
    expect((await call(t.wallets, 'getBalance', { userId: user.id })).balance).toEqual(money('0'));

    expect(await call(t.users, 'deleteUser', { id: user.id })).toEqual({});

    await expectGrpcError(call(t.users, 'getUser', { id: user.id }), NOT_FOUND, 'USER_NOT_FOUND');
    const listed = await call(t.users, 'listUsers', { pageSize: 500, pageToken: '', status: 0 });
    expect(listed.users.map((u) => u.id)).not.toContain(user.id);

    const ledger = await sql<{ type: string; amount: string }>(
      'select type, cast(amount as text) as amount from wallet_transactions where user_id = ? order by id',
      [Number(user.id)],
    );
    expect(ledger).toEqual([
      { type: 'CREDIT', amount: '5000000' },
      { type: 'DEBIT', amount: '5000000' },
    ]);
    const records = await sql<{ n: number }>('select count(*) as n from billing_records where user_id = ?', [Number(user.id)]);
    expect(Number(records[0].n)).toBe(1);
  });

  it('frees the email of a deleted user for a new user', async () => {
    const user = await createUser();
    await call(t.users, 'deleteUser', { id: user.id });
    const again = await createUser({ email: user.email });
    expect(again.id).not.toBe(user.id);
  });

  it('returns FAILED_PRECONDITION BALANCE_NOT_ZERO while the wallet holds money, and keeps the user', async () => {
    const user = await createUser();
    await call(t.wallets, 'addFunds', { userId: user.id, amount: money('0.01'), requestId: '' });
    await expectGrpcError(call(t.users, 'deleteUser', { id: user.id }), FAILED_PRECONDITION, 'BALANCE_NOT_ZERO');
    expect((await call(t.users, 'getUser', { id: user.id })).user!.id).toBe(user.id);
  });

  it('returns NOT_FOUND USER_NOT_FOUND when the user is already deleted, and INVALID_ID for id 0', async () => {
    const user = await createUser();
    await call(t.users, 'deleteUser', { id: user.id });
    await expectGrpcError(call(t.users, 'deleteUser', { id: user.id }), NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(call(t.users, 'deleteUser', { id: 0n }), INVALID_ARGUMENT, 'INVALID_ID');
  });
});

describe('ListUsers', () => {
  // A database of its own, so that the counts below are exact.
  let l: TestApp;

  beforeAll(async () => {
    l = await startTestApp();
  });

  afterAll(async () => {
    await l?.stop();
  });

  const list = (req: Partial<pb.ListUsersRequest>) =>
    call(l.users, 'listUsers', { pageSize: 0, pageToken: '', status: pb.UserStatus.USER_STATUS_UNSPECIFIED, ...req });

  /** Inserts n live users straight into the table (far faster than n RPCs); the listing is what is under test. */
  async function insertUsers(n: number, prefix: string): Promise<void> {
    const now = Date.now();
    const em = l.app.db.fork();
    for (let i = 0; i < n; i += 100) {
      const chunk = Array.from({ length: Math.min(100, n - i) }, (_, k) => i + k);
      await em.execute(
        `insert into users (email, name, status, suspension_reason, suspended_for_non_payment, deleted_at, created_at, updated_at)
         values ${chunk.map(() => "(?, ?, 'ACTIVE', '', ?, null, ?, ?)").join(', ')}`,
        chunk.flatMap((k) => [`${prefix}${k}@example.com`, `Bulk ${k}`, false, now, now]),
        'run',
      );
    }
  }

  it('returns an empty page and no token when there are no users', async () => {
    expect(await list({})).toEqual({ users: [], nextPageToken: '' });
  });

  it('pages through all users in ascending id order with stable pages and an empty token at the end', async () => {
    const created: pb.User[] = [];
    for (let i = 0; i < 7; i++) {
      created.push((await call(l.users, 'createUser', { email: `page${i}@example.com`, name: `P${i}`, requestId: '' })).user!);
    }
    const seen: bigint[] = [];
    const tokens: string[] = [];
    let token = '';
    do {
      const page = await list({ pageSize: 3, pageToken: token });
      expect(page.users.length).toBeLessThanOrEqual(3);
      seen.push(...page.users.map((u) => u.id));
      token = page.nextPageToken;
      tokens.push(token);
    } while (token !== '');
    expect(seen).toEqual(created.map((u) => u.id));
    expect(tokens.map((tk) => tk === '')).toEqual([false, false, true]);

    // The same token gives the same page again.
    const first = await list({ pageSize: 3 });
    const second = await list({ pageSize: 3, pageToken: first.nextPageToken });
    const secondAgain = await list({ pageSize: 3, pageToken: first.nextPageToken });
    expect(secondAgain).toEqual(second);
    expect(second.users.map((u) => u.id)).toEqual(created.slice(3, 6).map((u) => u.id));
  });

  it('filters by status, and UNSPECIFIED returns every status', async () => {
    const a = (await call(l.users, 'createUser', { email: 'filter-a@example.com', name: 'A', requestId: '' })).user!;
    const b = (await call(l.users, 'createUser', { email: 'filter-b@example.com', name: 'B', requestId: '' })).user!;
    await call(l.users, 'suspendUser', { id: a.id, reason: 'fraud check' });

    const suspended = await list({ status: pb.UserStatus.USER_STATUS_SUSPENDED, pageSize: 500 });
    expect(suspended.users.map((u) => u.id)).toEqual([a.id]);
    expect(suspended.users[0].suspensionReason).toBe('fraud check');

    const active = await list({ status: pb.UserStatus.USER_STATUS_ACTIVE, pageSize: 500 });
    expect(active.users.map((u) => u.id)).toContain(b.id);
    expect(active.users.map((u) => u.id)).not.toContain(a.id);
    expect(active.users.every((u) => u.status === pb.UserStatus.USER_STATUS_ACTIVE)).toBe(true);

    const all = await list({ pageSize: 500 });
    expect(all.users.map((u) => u.id)).toEqual(expect.arrayContaining([a.id, b.id]));
  });

  it('returns 50 users when page_size is 0 and at most 500 when page_size is larger', async () => {
    await insertUsers(520, 'bulk');
    const total = (await l.app.db.fork().execute<{ n: number }[]>('select count(*) as n from users where deleted_at is null'))[0].n;
    expect(Number(total)).toBeGreaterThan(500);

    const byDefault = await list({});
    expect(byDefault.users).toHaveLength(50);
    expect(byDefault.nextPageToken).not.toBe('');

    const capped = await list({ pageSize: 10_000 });
    expect(capped.users).toHaveLength(500);
    expect(capped.nextPageToken).not.toBe('');
    const ids = capped.users.map((u) => u.id);
    expect([...ids].sort((x, y) => (x < y ? -1 : x > y ? 1 : 0))).toEqual(ids);

    const rest = await list({ pageSize: 10_000, pageToken: capped.nextPageToken });
    expect(rest.users).toHaveLength(Number(total) - 500);
    expect(rest.nextPageToken).toBe('');
    expect(rest.users[0].id).toBeGreaterThan(ids[ids.length - 1]);
  });

  it('returns INVALID_ARGUMENT INVALID_PAGE_SIZE for a negative page_size', async () => {
    const err = await expectGrpcError(list({ pageSize: -1 }), INVALID_ARGUMENT, 'INVALID_PAGE_SIZE');
    expect(err.metadata.get('billing-error-field')).toEqual(['page_size']);
  });

  it.each(['garbage', 'bm90LWpzb24', Buffer.from(JSON.stringify({ a: -3, f: 'x' })).toString('base64url')])(
    'returns INVALID_ARGUMENT INVALID_PAGE_TOKEN for page_token %j',
    async (pageToken) => {
      await expectGrpcError(list({ pageToken }), INVALID_ARGUMENT, 'INVALID_PAGE_TOKEN');
    },
  );

  it('returns INVALID_ARGUMENT INVALID_PAGE_TOKEN for a token issued under another status filter', async () => {
    const page = await list({ pageSize: 1 });
    expect(page.nextPageToken).not.toBe('');
    await expectGrpcError(
      list({ pageSize: 1, pageToken: page.nextPageToken, status: pb.UserStatus.USER_STATUS_ACTIVE }),
      INVALID_ARGUMENT,
      'INVALID_PAGE_TOKEN',
    );
  });

  it('returns INVALID_ARGUMENT INVALID_ENUM for a status number the service does not know', async () => {
    const err = await expectGrpcError(list({ status: 7 as pb.UserStatus }), INVALID_ARGUMENT, 'INVALID_ENUM');
    expect(err.metadata.get('billing-error-field')).toEqual(['status']);
  });
});

describe('when the database fails', () => {
  // A database of its own: these tests break it on purpose.
  let d: TestApp;

  beforeAll(async () => {
    d = await startTestApp();
  });

  afterAll(async () => {
    await d?.stop();
  });

  // SQLite has one writer: a second process holding the write lock is the failure to prove. (PostgreSQL locks rows,
  // so an unrelated writer never blocks CreateUser there.)
  (onPostgres ? it.skip : it)('returns UNAVAILABLE DATABASE_UNAVAILABLE while another connection holds the write lock past the busy timeout', async () => {
    const other = await openDatabase({ kind: 'sqlite', path: path.join(d.dir, 'billing.db') }, pino({ level: 'silent' }));
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    let locked!: () => void;
    const isLocked = new Promise<void>((resolve) => (locked = resolve));
    const holder = other.fork().transactional(async (tx) => {
      await tx.execute('update users set name = name', [], 'run');
      await tx.execute("insert into idempotency_keys values ('lock', 'lock', 'x', 0, 0)", [], 'run');
      locked();
      await held;
    });
    try {
      await isLocked;
      const err = await expectGrpcError(
        call(d.users, 'createUser', { email: 'busy@example.com', name: 'Busy', requestId: '' }, { deadlineMs: 20_000 }),
        grpc.status.UNAVAILABLE,
        'DATABASE_UNAVAILABLE',
      );
      expect(err.details).not.toMatch(/SQLITE|locked|insert|select/i);
    } finally {
      release();
      await holder;
      await other.close();
    }
    // Once the lock is gone the same request goes through.
    const res = await call(d.users, 'createUser', { email: 'busy@example.com', name: 'Busy', requestId: '' });
    expect(res.user!.email).toBe('busy@example.com');
  });

  it('returns INTERNAL "internal error" without SQL or table names for an unexpected failure, and keeps serving', async () => {
    const user = (await call(d.users, 'createUser', { email: 'before-drop@example.com', name: 'B', requestId: '' })).user!;
    await d.app.db.fork().execute('drop table idempotency_keys', [], 'run');

    const err = await expectGrpcError(
      call(d.users, 'createUser', { email: 'after-drop@example.com', name: 'A', requestId: 'needs-the-dropped-table' }),
      grpc.status.INTERNAL,
      'INTERNAL',
    );
    expect(err.details).toBe('internal error');
    const trailers = Object.values(err.metadata.getMap())
      .map((v) => (Buffer.isBuffer(v) ? v.toString('latin1') : String(v)))
      .join('\n');
    expect(trailers).not.toMatch(/idempotency_keys|no such table|select|SQLITE/i);

    // The process survived the failed call and still answers.
    expect((await call(d.users, 'getUser', { id: user.id })).user!.email).toBe('before-drop@example.com');
  });
});

describe('RPC logging', () => {
  /** CreateUser, a GetUser for a missing user and a GetUser that fails inside (INTERNAL), with their rpc lines. */
  async function threeCalls(env: Record<string, string>): Promise<Record<string, unknown>[]> {
    const lines: Record<string, unknown>[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        lines.push(JSON.parse(chunk.toString('utf8')));
        done();
      },
    });
    const r = await startTestApp(env, { log: pino({ level: 'info' }, sink) });
    try {
      const user = (await call(r.users, 'createUser', { email: 'logged@example.com', name: 'L', requestId: '' })).user!;
      await expectGrpcError(call(r.users, 'getUser', { id: 987_654_321n }), NOT_FOUND, 'USER_NOT_FOUND');
      await r.app.db.fork().execute('alter table users rename to users_gone', [], 'run');
      await expectGrpcError(call(r.users, 'getUser', { id: user.id }), grpc.status.INTERNAL, 'INTERNAL');
    } finally {
      await r.stop();
    }
    const rpcLines = lines.filter((l) => l.msg === 'rpc');
    for (const line of rpcLines) expect(typeof line.durationMs).toBe('number');
    // The full error behind the INTERNAL went to the log, not to the client.
    expect(JSON.stringify(lines)).toMatch(/no such table: users|relation \\"users\\" does not exist/);
    return rpcLines.map(({ method, code, reason, level }) => ({ method, code, reason, level }));
  }

  it('at LOG_LEVEL=info logs a money-moving call at info and a server fault at error, and a read refused as NOT_FOUND not at all', async () => {
    expect(await threeCalls({})).toEqual([
      { method: 'CreateUser', code: 'OK', reason: undefined, level: 30 },
      { method: 'GetUser', code: 'INTERNAL', reason: 'INTERNAL', level: 50 },
    ]);
  });

  it('with ACCESS_LOG=true logs one line per call with method, code, reason and duration, at error only for server faults', async () => {
    expect(await threeCalls({ ACCESS_LOG: 'true' })).toEqual([
      { method: 'CreateUser', code: 'OK', reason: undefined, level: 30 },
      { method: 'GetUser', code: 'NOT_FOUND', reason: 'USER_NOT_FOUND', level: 30 },
      { method: 'GetUser', code: 'INTERNAL', reason: 'INTERNAL', level: 50 },
    ]);
  });
});
