import * as grpc from '@grpc/grpc-js';
import type * as moneyPb from '../../generated/billing/v1/money';
import * as pb from '../../generated/billing/v1/wallet_service';
import { call, expectGrpcError, money, startTestApp, type TestApp } from '../helpers/harness';

const { INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS } = grpc.status;
const { WALLET_TRANSACTION_TYPE_CREDIT, WALLET_TRANSACTION_TYPE_DEBIT } = pb.WalletTransactionType;

let t: TestApp;
let seq = 0;

beforeAll(async () => {
  t = await startTestApp();
});

afterAll(async () => {
  await t?.stop();
});

async function newUserId(): Promise<bigint> {
  const res = await call(t.users, 'createUser', { email: `wallet${++seq}@example.com`, name: 'Wallet Owner', requestId: '' });
  return res.user!.id;
}

const addFunds = (userId: bigint, amount: moneyPb.Money | undefined, requestId = '') =>
  call(t.wallets, 'addFunds', { userId, amount, requestId });

const balanceOf = async (userId: bigint) => (await call(t.wallets, 'getBalance', { userId })).balance;

async function sql<T>(query: string, params: unknown[] = []): Promise<T[]> {
  return t.app.db.fork().execute<T[]>(query, params);
}

/** The ledger as the database holds it: row count and credits - debits, in micros. */
async function ledgerOf(userId: bigint): Promise<{ rows: number; net: string }> {
  const [row] = await sql<{ n: number; net: string }>(
    `select count(*) as n,
            cast(coalesce(sum(case when type = 'CREDIT' then amount else -amount end), 0) as text) as net
     from wallet_transactions where user_id = ?`,
    [Number(userId)],
  );
  return { rows: Number(row.n), net: row.net };
}

describe('GetWallet and GetBalance', () => {
  it('returns a new user\'s empty wallet in the deployment currency', async () => {
    const userId = await newUserId();
    const { wallet } = await call(t.wallets, 'getWallet', { userId });
    expect(wallet).toMatchObject({ userId, balance: { currencyCode: 'USD', units: 0n, nanos: 0 } });
    expect(wallet!.createTime).toBeInstanceOf(Date);
    expect(wallet!.updateTime).toBeInstanceOf(Date);
    expect(await balanceOf(userId)).toEqual({ currencyCode: 'USD', units: 0n, nanos: 0 });
  });

  it('returns NOT_FOUND USER_NOT_FOUND for an unknown user and for a deleted one', async () => {
    await expectGrpcError(call(t.wallets, 'getWallet', { userId: 987_654_321n }), NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(call(t.wallets, 'getBalance', { userId: 987_654_321n }), NOT_FOUND, 'USER_NOT_FOUND');
    const userId = await newUserId();
    await call(t.users, 'deleteUser', { id: userId });
    await expectGrpcError(call(t.wallets, 'getWallet', { userId }), NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(call(t.wallets, 'getBalance', { userId }), NOT_FOUND, 'USER_NOT_FOUND');
  });

  it.each([0n, -7n])('returns INVALID_ARGUMENT INVALID_ID for user_id %s', async (userId) => {
    const err = await expectGrpcError(call(t.wallets, 'getWallet', { userId }), INVALID_ARGUMENT, 'INVALID_ID');
    expect(err.metadata.get('billing-error-field')).toEqual(['user_id']);
    await expectGrpcError(call(t.wallets, 'getBalance', { userId }), INVALID_ARGUMENT, 'INVALID_ID');
  });
});

describe('AddFunds', () => {
  it('credits the wallet and returns the wallet and its CREDIT ledger row', async () => {
    const userId = await newUserId();
    const res = await addFunds(userId, money('12.34'), 'top-up-happy-1');
    expect(res.wallet).toMatchObject({ userId, balance: money('12.34') });
    expect(res.transaction).toMatchObject({
      userId,
      type: WALLET_TRANSACTION_TYPE_CREDIT,
      amount: money('12.34'),
      balanceAfter: money('12.34'),
      billingRecordId: 0n,
      requestId: 'top-up-happy-1',
    });
    expect(res.transaction!.id).toBeGreaterThan(0n);
    expect(res.transaction!.createTime).toBeInstanceOf(Date);

    const again = await addFunds(userId, money('0.66'));
    expect(again.transaction).toMatchObject({ amount: money('0.66'), balanceAfter: money('13.00'), requestId: '' });
    expect(await balanceOf(userId)).toEqual(money('13.00'));
    expect(await ledgerOf(userId)).toEqual({ rows: 2, net: '13000000' });
  });

  it('adds 0.1 and 0.2 to exactly units=0 nanos=300000000', async () => {
    const userId = await newUserId();
    await addFunds(userId, money('0.1'));
    const res = await addFunds(userId, money('0.2'));
    expect(res.wallet!.balance).toEqual({ currencyCode: 'USD', units: 0n, nanos: 300_000_000 });
    expect(await balanceOf(userId)).toEqual({ currencyCode: 'USD', units: 0n, nanos: 300_000_000 });
  });

  it('treats an empty currency_code as the deployment currency and upper-cases the code', async () => {
    const userId = await newUserId();
    await addFunds(userId, { currencyCode: '', units: 1n, nanos: 0 });
    await addFunds(userId, { currencyCode: 'usd', units: 0n, nanos: 500_000_000 });
    expect(await balanceOf(userId)).toEqual(money('1.50'));
  });

  it('returns INVALID_ARGUMENT AMOUNT_TOO_PRECISE when nanos is not a multiple of 1000, and credits nothing', async () => {
    const userId = await newUserId();
    const err = await expectGrpcError(
      addFunds(userId, { currencyCode: 'USD', units: 1n, nanos: 1 }),
      INVALID_ARGUMENT,
      'AMOUNT_TOO_PRECISE',
    );
    expect(err.metadata.get('billing-error-field')).toEqual(['amount']);
    await expectGrpcError(addFunds(userId, { currencyCode: 'USD', units: 0n, nanos: 999_999_999 }), INVALID_ARGUMENT, 'AMOUNT_TOO_PRECISE');
    expect(await ledgerOf(userId)).toEqual({ rows: 0, net: '0' });
  });

  it('returns INVALID_ARGUMENT CURRENCY_MISMATCH for another currency', async () => {
    const userId = await newUserId();
    await expectGrpcError(addFunds(userId, { currencyCode: 'EUR', units: 5n, nanos: 0 }), INVALID_ARGUMENT, 'CURRENCY_MISMATCH');
    expect(await balanceOf(userId)).toEqual(money('0'));
  });

  it.each<[string, moneyPb.Money]>([
    ['zero', { currencyCode: 'USD', units: 0n, nanos: 0 }],
    ['negative units', { currencyCode: 'USD', units: -1n, nanos: 0 }],
    ['negative nanos', { currencyCode: 'USD', units: 0n, nanos: -1000 }],
  ])('returns INVALID_ARGUMENT NON_POSITIVE_AMOUNT for a %s amount', async (_label, amount) => {
    const userId = await newUserId();
    await expectGrpcError(addFunds(userId, amount), INVALID_ARGUMENT, 'NON_POSITIVE_AMOUNT');
    expect(await ledgerOf(userId)).toEqual({ rows: 0, net: '0' });
  });

  it('returns INVALID_ARGUMENT for a missing amount, mixed signs and nanos out of range', async () => {
    const userId = await newUserId();
    await expectGrpcError(addFunds(userId, undefined), INVALID_ARGUMENT, 'MISSING_AMOUNT');
    await expectGrpcError(addFunds(userId, { currencyCode: 'USD', units: 1n, nanos: -5000 }), INVALID_ARGUMENT, 'INVALID_AMOUNT');
    await expectGrpcError(
      addFunds(userId, { currencyCode: 'USD', units: 0n, nanos: 1_000_000_000 }),
      INVALID_ARGUMENT,
      'INVALID_AMOUNT',
    );
  });

  it('returns NOT_FOUND USER_NOT_FOUND for an unknown user and INVALID_ID for user_id 0', async () => {
    await expectGrpcError(addFunds(987_654_321n, money('1')), NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(addFunds(0n, money('1')), INVALID_ARGUMENT, 'INVALID_ID');
  });

  it('replays the first response for the same request_id and request, changing neither balance nor ledger', async () => {
    const userId = await newUserId();
    const first = await addFunds(userId, money('7.25'), 'add-funds-replay-1');
    await addFunds(userId, money('1.00')); // the balance moves on after the first call
    const before = await ledgerOf(userId);

    const again = await addFunds(userId, money('7.25'), 'add-funds-replay-1');
    expect(again.transaction).toEqual(first.transaction);
    expect(again.wallet!.balance).toEqual(first.wallet!.balance);
    expect(await ledgerOf(userId)).toEqual(before);
    expect(await balanceOf(userId)).toEqual(money('8.25'));
  });

  it('returns ALREADY_EXISTS REQUEST_ID_REUSED when the request_id comes back with a different amount', async () => {
    const userId = await newUserId();
    await addFunds(userId, money('2.00'), 'add-funds-reused-1');
    const before = await ledgerOf(userId);
    await expectGrpcError(addFunds(userId, money('3.00'), 'add-funds-reused-1'), ALREADY_EXISTS, 'REQUEST_ID_REUSED');
    expect(await ledgerOf(userId)).toEqual(before);
    expect(await balanceOf(userId)).toEqual(money('2.00'));
  });

  it('ends at exactly 50.00 with 50 ledger rows after 50 concurrent AddFunds of 1.00', async () => {
    const userId = await newUserId();
    const results = await Promise.all(Array.from({ length: 50 }, () => addFunds(userId, money('1.00'))));

    expect(await balanceOf(userId)).toEqual(money('50.00'));
    const ledger = await ledgerOf(userId);
    expect(ledger).toEqual({ rows: 50, net: '50000000' });

    // Every credit saw a distinct balance: 1.00, 2.00, ..., 50.00.
    const after = results.map((r) => r.transaction!.balanceAfter!.units).sort((a, b) => Number(a - b));
    expect(after).toEqual(Array.from({ length: 50 }, (_, i) => BigInt(i + 1)));
  });

  it('keeps the balance equal to credits minus debits after a charge', async () => {
    const userId = await newUserId();
    await addFunds(userId, money('10.00'));
    await call(t.billing, 'createBillingRecord', { userId, amount: money('3.75'), description: 'consulting', requestId: '' });
    const balance = await balanceOf(userId);
    expect(balance).toEqual(money('6.25'));
    expect(await ledgerOf(userId)).toEqual({ rows: 2, net: '6250000' });
  });
});

describe('ListWalletTransactions', () => {
  const list = (userId: bigint, pageSize = 0, pageToken = '') => call(t.wallets, 'listWalletTransactions', { userId, pageSize, pageToken });

  it('returns an empty page and no token for a wallet without history', async () => {
    const userId = await newUserId();
    expect(await list(userId)).toEqual({ transactions: [], nextPageToken: '' });
  });

  it('pages through the ledger in ascending id order with stable pages and an empty token at the end', async () => {
    const userId = await newUserId();
    const other = await newUserId();
    const made: pb.WalletTransaction[] = [];
    for (const units of ['1', '2', '3', '4', '5']) {
      made.push((await addFunds(userId, money(units))).transaction!);
      await addFunds(other, money('9')); // interleaved rows of another wallet never show up
    }

    const seen: pb.WalletTransaction[] = [];
    const tokens: string[] = [];
    let token = '';
    do {
      const page = await list(userId, 2, token);
      seen.push(...page.transactions);
      token = page.nextPageToken;
      tokens.push(token);
    } while (token !== '');
    expect(seen).toEqual(made);
    expect(tokens.map((tk) => tk === '')).toEqual([false, false, true]);
    expect(seen.map((tx) => tx.balanceAfter)).toEqual(['1', '3', '6', '10', '15'].map(money));

    const first = await list(userId, 2);
    expect(await list(userId, 2, first.nextPageToken)).toEqual(await list(userId, 2, first.nextPageToken));
  });

  it('shows the DEBIT row of a paid billing record next to the credits', async () => {
    const userId = await newUserId();
    await addFunds(userId, money('4.00'));
    const charged = await call(t.billing, 'createBillingRecord', { userId, amount: money('1.50'), description: 'fee', requestId: '' });
    const { transactions } = await list(userId);
    expect(transactions.map((tx) => tx.type)).toEqual([WALLET_TRANSACTION_TYPE_CREDIT, WALLET_TRANSACTION_TYPE_DEBIT]);
    expect(transactions[1]).toMatchObject({
      amount: money('1.50'),
      balanceAfter: money('2.50'),
      billingRecordId: charged.billingRecord!.id,
    });
  });

  it('returns 50 rows when page_size is 0', async () => {
    const userId = await newUserId();
    for (let i = 0; i < 55; i++) await addFunds(userId, money('0.01'));
    const page = await list(userId);
    expect(page.transactions).toHaveLength(50);
    const rest = await list(userId, 0, page.nextPageToken);
    expect(rest.transactions).toHaveLength(5);
    expect(rest.nextPageToken).toBe('');
  });

  it('returns INVALID_ARGUMENT for a negative page_size, a bad token and a token from another wallet', async () => {
    const userId = await newUserId();
    const other = await newUserId();
    await addFunds(other, money('1'));
    await addFunds(other, money('1'));
    const otherPage = await list(other, 1);
    expect(otherPage.nextPageToken).not.toBe('');

    await expectGrpcError(list(userId, -1), INVALID_ARGUMENT, 'INVALID_PAGE_SIZE');
    await expectGrpcError(list(userId, 0, '%%%'), INVALID_ARGUMENT, 'INVALID_PAGE_TOKEN');
    await expectGrpcError(list(userId, 1, otherPage.nextPageToken), INVALID_ARGUMENT, 'INVALID_PAGE_TOKEN');
  });

  it('returns NOT_FOUND USER_NOT_FOUND for an unknown user and INVALID_ID for user_id 0', async () => {
    await expectGrpcError(list(987_654_321n), NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(list(0n), INVALID_ARGUMENT, 'INVALID_ID');
  });
});
