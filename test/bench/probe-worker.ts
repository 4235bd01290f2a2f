/**
 * A GetBalance probe on its own thread: one call at a time (then a 2 ms
 * pause), its latencies sent back when told to stop. The benchmark's own
 * thread builds and encodes large batches synchronously; a probe on that
 * thread would time those pauses of the client, not the service's answers.
 */
import { parentPort, Worker, workerData } from 'node:worker_threads';
import * as grpc from '@grpc/grpc-js';
import * as walletPb from '../../generated/billing/v1/wallet_service';

interface ProbeData {
  address: string;
  users: number;
}

export interface BalanceProbe {
  /** Stops the probe and resolves with every latency it measured (ms). */
  stop(): Promise<number[]>;
}

/** Starts a probe of `address`'s GetBalance over users 1..`users`. */
export function startBalanceProbe(address: string, users: number): BalanceProbe {
  const worker = new Worker(__filename, { workerData: { address, users } satisfies ProbeData });
  const done = new Promise<number[]>((resolve, reject) => {
    worker.once('message', (latencies: number[]) => resolve(latencies));
    worker.once('error', reject);
  });
  return {
    async stop() {
      worker.postMessage('stop');
      const latencies = await done;
      await worker.terminate();
      return latencies;
    },
  };
}

function probe({ address, users }: ProbeData): void {
  const client = new walletPb.WalletServiceClient(address, grpc.credentials.createInsecure());
  const latencies: number[] = [];
  let running = true;
  parentPort!.on('message', () => (running = false));
  const next = () => {
    if (!running) {
      client.close();
      parentPort!.postMessage(latencies);
      return;
    }
    const t = performance.now();
    client.getBalance({ userId: BigInt(1 + (latencies.length % users)) }, (err) => {
      if (err) throw err;
      latencies.push(performance.now() - t);
      setTimeout(next, 2);
    });
  };
  next();
}

if (parentPort && workerData) probe(workerData as ProbeData);
