/**
 * The RPC baseline: a grpc-js server (the service's default server options) with one
 * unary method, /bench.v1.Trivial/Get, that ignores its request and returns a
 * constant (an encoded GetBalanceResponse). Run as its own process, like the
 * service, so both are measured the same way.
 *
 *   node dist/test/bench/trivial-server.js <port>     prints "ready <port>"
 */
import * as grpc from '@grpc/grpc-js';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import { DEFAULT_GRPC_LIMITS } from '../../src/config';
import { serverOptions } from '../../src/grpc/server';

export const TRIVIAL_PATH = '/bench.v1.Trivial/Get';

const RESPONSE = Buffer.from(
  walletPb.GetBalanceResponse.encode({ balance: { currencyCode: 'USD', units: 42n, nanos: 500_000_000 } }).finish(),
);

function main(): void {
  const port = Number(process.argv[2] ?? 0);
  const server = new grpc.Server(serverOptions(DEFAULT_GRPC_LIMITS));
  const identity = (b: Buffer) => b;
  server.addService(
    {
      Get: {
        path: TRIVIAL_PATH,
        requestStream: false,
        responseStream: false,
        requestSerialize: identity,
        requestDeserialize: identity,
        responseSerialize: identity,
        responseDeserialize: identity,
      },
    },
    { Get: (_call: grpc.ServerUnaryCall<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>) => callback(null, RESPONSE) },
  );
  server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err, bound) => {
    if (err) throw err;
    process.stdout.write(`ready ${bound}\n`);
  });
  process.on('SIGTERM', () => server.tryShutdown(() => process.exit(0)));
}

if (require.main === module) main();
