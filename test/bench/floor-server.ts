/**
 * The RPC floor with the service's driver: a grpc-js server (the service's
 * default options) whose GetBalance and AddFunds do the same SQL as the
 * service on the same SQLite file and pragmas with raw better-sqlite3 prepared
 * statements: no ORM, no per-call unit of work, no log line, no idempotency
 * or settlement. What the service could reach on this driver at best.
 *
 *   node dist/test/bench/floor-server.js <port> <sqlite file>     prints "ready <port>"
 *
 * Paths: /bench.v1.Floor/GetBalance and /bench.v1.Floor/AddFunds, with the
 * service's request and response messages.
 */
import * as grpc from '@grpc/grpc-js';
import Database from 'better-sqlite3';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import { DEFAULT_GRPC_LIMITS } from '../../src/config';
import { SQLITE_PRAGMAS } from '../../src/db/engine';
import { serverOptions } from '../../src/grpc/server';
import { microsToMoney, moneyToMicros } from '../../src/shared/money';

export const FLOOR_GET_BALANCE = '/bench.v1.Floor/GetBalance';
export const FLOOR_ADD_FUNDS = '/bench.v1.Floor/AddFunds';

function main(): void {
  const port = Number(process.argv[2] ?? 0);
  const db = new Database(process.argv[3]);
  db.exec(SQLITE_PRAGMAS);
  const read = db.prepare(
    `select cast(w.balance as text) as balance, w.created_at, w.updated_at
     from wallets w join users u on u.id = w.user_id where w.user_id = ? and u.deleted_at is null`,
  );
  const credit = db.prepare(
    `update wallets set balance = balance + cast(? as bigint), updated_at = ? where user_id = ? returning cast(balance as text) as balance, created_at`,
  );
  const ledger = db.prepare(
    `insert into wallet_transactions (user_id, type, amount, balance_after, billing_record_id, request_id, created_at)
     values (?, 'CREDIT', cast(? as bigint), cast(? as bigint), null, null, ?) returning id`,
  );
  // better-sqlite3 is synchronous: each call runs to its end on the event loop, one writer at a time.
  const addFunds = db.transaction((amount: string, now: number, userId: number) => {
    const w = credit.get(amount, now, userId) as { balance: string; created_at: number } | undefined;
    if (!w) throw new Error('no wallet');
    const t = ledger.get(userId, amount, w.balance, now) as { id: number };
    return { w, t };
  });

  const server = new grpc.Server(serverOptions(DEFAULT_GRPC_LIMITS));
  const identity = (b: Buffer) => b;
  const def = (path: string) => ({
    path,
    requestStream: false,
    responseStream: false,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  });
  server.addService(
    { GetBalance: def(FLOOR_GET_BALANCE), AddFunds: def(FLOOR_ADD_FUNDS) },
    {
      GetBalance: (call: grpc.ServerUnaryCall<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
        const req = walletPb.GetBalanceRequest.decode(call.request);
        let row: { balance: string } | undefined;
        try {
          row = read.get(Number(req.userId)) as { balance: string } | undefined;
        } catch (err) {
          return cb({ code: grpc.status.INTERNAL, details: (err as Error).message });
        }
        if (!row) return cb({ code: grpc.status.NOT_FOUND });
        cb(null, Buffer.from(walletPb.GetBalanceResponse.encode({ balance: microsToMoney(BigInt(row.balance), 'USD') }).finish()));
      },
      AddFunds: (call: grpc.ServerUnaryCall<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
        const req = walletPb.AddFundsRequest.decode(call.request);
        const userId = Number(req.userId);
        const amount = moneyToMicros(req.amount, 'USD', 'amount');
        const now = Date.now();
        let done: { w: { balance: string; created_at: number }; t: { id: number } };
        try {
          done = addFunds(amount.toString(), now, userId);
        } catch (err) {
          return cb({ code: grpc.status.INTERNAL, details: (err as Error).message });
        }
        const { w, t } = done;
        cb(
          null,
          Buffer.from(
            walletPb.AddFundsResponse.encode({
              wallet: { userId: req.userId, balance: microsToMoney(BigInt(w.balance), 'USD'), createTime: new Date(w.created_at), updateTime: new Date(now) },
              transaction: {
                id: BigInt(t.id),
                userId: req.userId,
                type: walletPb.WalletTransactionType.WALLET_TRANSACTION_TYPE_CREDIT,
                amount: microsToMoney(amount, 'USD'),
                balanceAfter: microsToMoney(BigInt(w.balance), 'USD'),
                billingRecordId: 0n,
                requestId: '',
                createTime: new Date(now),
              },
              settledBillingRecordIds: [],
            }).finish(),
          ),
        );
      },
    },
  );
  server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err, bound) => {
    if (err) throw err;
    process.stdout.write(`ready ${bound}\n`);
  });
  process.on('SIGTERM', () =>
    server.tryShutdown(() => {
      db.close();
      process.exit(0);
    }),
  );
}

if (require.main === module) main();
