import { EventEmitter } from 'node:events';
import * as grpc from '@grpc/grpc-js';
import type { EntityManager } from '@mikro-orm/knex';
import pino from 'pino';
import { createUnary, type CallContext } from '../../src/grpc/adapter';

/** A grpc-js unary call as the adapter uses it: a request, metadata, the `cancelled` flag and event. */
function fakeCall(request: object): grpc.ServerUnaryCall<object, object> {
  return Object.assign(new EventEmitter(), { request, metadata: new grpc.Metadata(), cancelled: false }) as unknown as grpc.ServerUnaryCall<object, object>;
}

/** What grpc-js does when a call is cancelled (or its stream closes): sets the flag, then emits. */
function cancel(call: grpc.ServerUnaryCall<object, object>): void {
  call.cancelled = true;
  call.emit('cancelled', 'cancelled');
}

function setup() {
  let forks = 0;
  const unary = createUnary({ fork: () => (forks++, {} as EntityManager), log: pino({ level: 'silent' }) });
  return { unary, forks: () => forks };
}

const answered = () => {
  let resolve!: (v: { err: grpc.ServiceError | null; res?: object }) => void;
  const done = new Promise<{ err: grpc.ServiceError | null; res?: object }>((r) => (resolve = r));
  const cb: grpc.sendUnaryData<object> = (err, res) => resolve({ err: err as grpc.ServiceError | null, res: res ?? undefined });
  return { cb, done };
};

describe('the unary adapter call context', () => {
  it("aborts the signal when the client cancels before the answer, with CALL_CANCELLED as the reason", async () => {
    const { unary } = setup();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let seen: CallContext | undefined;
    const handler = unary<object, object>('Slow', async (_req, ctx) => {
      seen = ctx;
      await gate;
      ctx.signal.throwIfAborted();
      return {};
    });
    const call = fakeCall({});
    const { cb, done } = answered();
    handler(call, cb);
    await new Promise((r) => setImmediate(r));
    cancel(call);
    release();
    const { err } = await done;
    expect(seen!.signal.aborted).toBe(true);
    expect((seen!.signal.reason as { reason?: string }).reason).toBe('CALL_CANCELLED');
    expect(err?.code).toBe(grpc.status.CANCELLED);
  });

  it("does not abort a call already answered when grpc-js says 'cancelled' as its stream closes", async () => {
    const { unary } = setup();
    let seen: CallContext | undefined;
    const handler = unary<object, object>('Fast', async (_req, ctx) => {
      seen = ctx;
      return {};
    });
    const call = fakeCall({});
    const { cb, done } = answered();
    handler(call, cb);
    expect((await done).err).toBeNull();
    cancel(call);
    expect(seen!.signal.aborted).toBe(false);
  });

  it('aborts a signal taken before the client cancels, as the cancellation comes', async () => {
    const { unary } = setup();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let abortedBeforeRelease: boolean | undefined;
    const handler = unary<object, object>('Watching', async (_req, ctx) => {
      const { signal } = ctx;
      await gate;
      abortedBeforeRelease = signal.aborted;
      signal.throwIfAborted();
      return {};
    });
    const call = fakeCall({});
    const { cb, done } = answered();
    handler(call, cb);
    await new Promise((r) => setImmediate(r));
    cancel(call);
    release();
    const { err } = await done;
    expect(abortedBeforeRelease).toBe(true);
    expect(err?.code).toBe(grpc.status.CANCELLED);
  });

  it('forks a unit of work only for a handler that uses one, once per call', async () => {
    const { unary, forks } = setup();
    const none = answered();
    unary<object, object>('NoEm', async () => ({}))(fakeCall({}), none.cb);
    await none.done;
    expect(forks()).toBe(0);
    const twice = answered();
    unary<object, object>('Em', async (_req, ctx) => (ctx.em === ctx.em ? {} : Promise.reject(new Error('two forks'))))(fakeCall({}), twice.cb);
    expect((await twice.done).err).toBeNull();
    expect(forks()).toBe(1);
  });
});
