import { Writable } from 'node:stream';
import * as grpc from '@grpc/grpc-js';
import { BinaryReader, WireType } from '@bufbuild/protobuf/wire';
import { LockWaitTimeoutException } from '@mikro-orm/core';
import pino from 'pino';
import { AppError, type ErrorKind } from '../../src/shared/errors';
import { toServiceError } from '../../src/grpc/status';

/** A logger whose JSON lines land in `lines`. */
function capturingLogger() {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      lines.push(JSON.parse(chunk.toString('utf8')));
      done();
    },
  });
  return { log: pino({ level: 'trace' }, sink), lines };
}

interface DecodedStatus {
  code: number;
  message: string;
  details: { typeUrl: string; value: Uint8Array }[];
}

interface DecodedErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

/** google.rpc.Status, decoded independently of the encoder under test. */
function decodeStatus(bytes: Uint8Array): DecodedStatus {
  const r = new BinaryReader(bytes);
  const out: DecodedStatus = { code: 0, message: '', details: [] };
  while (r.pos < r.len) {
    const [field, type] = r.tag();
    if (field === 1 && type === WireType.Varint) out.code = r.int32();
    else if (field === 2 && type === WireType.LengthDelimited) out.message = r.string();
    else if (field === 3 && type === WireType.LengthDelimited) {
      const any = new BinaryReader(r.bytes());
      const detail: DecodedStatus['details'][number] = { typeUrl: '', value: new Uint8Array() };
      while (any.pos < any.len) {
        const [f, t] = any.tag();
        if (f === 1) detail.typeUrl = any.string();
        else if (f === 2) detail.value = any.bytes();
        else any.skip(t);
      }
      out.details.push(detail);
    } else r.skip(type);
  }
  return out;
}

function decodeErrorInfo(bytes: Uint8Array): DecodedErrorInfo {
  const r = new BinaryReader(bytes);
  const out: DecodedErrorInfo = { reason: '', domain: '', metadata: {} };
  while (r.pos < r.len) {
    const [field, type] = r.tag();
    if (field === 1) out.reason = r.string();
    else if (field === 2) out.domain = r.string();
    else if (field === 3) {
      const entry = new BinaryReader(r.bytes());
      let key = '';
      let value = '';
      while (entry.pos < entry.len) {
        const [f, t] = entry.tag();
        if (f === 1) key = entry.string();
        else if (f === 2) value = entry.string();
        else entry.skip(t);
      }
      out.metadata[key] = value;
    } else r.skip(type);
  }
  return out;
}

function trailer(md: grpc.Metadata | undefined, key: string): string | undefined {
  const value = md?.get(key)[0];
  return value === undefined ? undefined : String(value);
}

function statusDetails(md: grpc.Metadata | undefined): { status: DecodedStatus; info: DecodedErrorInfo } {
  const raw = md?.get('grpc-status-details-bin')[0];
  expect(Buffer.isBuffer(raw)).toBe(true);
  const status = decodeStatus(raw as Buffer);
  expect(status.details).toHaveLength(1);
  expect(status.details[0].typeUrl).toBe('type.googleapis.com/google.rpc.ErrorInfo');
  return { status, info: decodeErrorInfo(status.details[0].value) };
}

/** Every trailer value as text, to look for leaks. */
function everythingSent(result: Partial<grpc.StatusObject>): string {
  const md = result.metadata?.getMap() ?? {};
  const values = Object.values(md).map((v) => (Buffer.isBuffer(v) ? v.toString('latin1') : String(v)));
  return [result.details ?? '', ...values].join('\n');
}

describe('toServiceError', () => {
  const kinds: ErrorKind[] = [
    'INVALID_ARGUMENT',
    'NOT_FOUND',
    'ALREADY_EXISTS',
    'FAILED_PRECONDITION',
    'ABORTED',
    'UNAVAILABLE',
    'RESOURCE_EXHAUSTED',
    'OUT_OF_RANGE',
    'UNAUTHENTICATED',
    'PERMISSION_DENIED',
  ];
  // [kind, expected status name, expected code]: every kind maps to the gRPC code of the same name.
  const table = kinds.map((kind) => [kind, kind, grpc.status[kind]] as const);

  it.each(table)('maps AppError kind %s to status %s, keeping its message (ending with the reason) and reason', (kind, _name, code) => {
    const { log, lines } = capturingLogger();
    const result = toServiceError(new AppError(kind, `SOME_${kind}`, `message for ${kind}`), log);
    expect(result.code).toBe(code);
    expect(result.details).toBe(`message for ${kind} [SOME_${kind}]`);
    expect(trailer(result.metadata, 'billing-error-reason')).toBe(`SOME_${kind}`);
    expect(trailer(result.metadata, 'billing-error-field')).toBeUndefined();
    const { status, info } = statusDetails(result.metadata);
    expect(status).toMatchObject({ code, message: `message for ${kind} [SOME_${kind}]` });
    expect(info).toEqual({ reason: `SOME_${kind}`, domain: 'billing.v1', metadata: {} });
    // A domain error is the client's business, not an operator's alarm.
    expect(lines.filter((l) => (l.level as number) >= 50)).toHaveLength(0);
  });

  it('sends the field at fault as a trailer and as ErrorInfo metadata', () => {
    const { log } = capturingLogger();
    const err = new AppError('INVALID_ARGUMENT', 'INVALID_EMAIL', 'email is not a valid address', 'email');
    const result = toServiceError(err, log);
    expect(result.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(trailer(result.metadata, 'billing-error-reason')).toBe('INVALID_EMAIL');
    expect(trailer(result.metadata, 'billing-error-field')).toBe('email');
    const { status, info } = statusDetails(result.metadata);
    expect(status.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(info).toEqual({ reason: 'INVALID_EMAIL', domain: 'billing.v1', metadata: { field: 'email' } });
  });

  it('turns an unknown error into INTERNAL "internal error" without leaking its message, and logs it in full', () => {
    const { log, lines } = capturingLogger();
    const secret = 'SQLITE_ERROR: no such column: password_hash in SELECT * FROM users at /srv/app/src/x.ts';
    const err = new Error(secret);
    const result = toServiceError(err, log);
    expect(result.code).toBe(grpc.status.INTERNAL);
    expect(result.details).toBe('internal error');
    expect(trailer(result.metadata, 'billing-error-reason')).toBe('INTERNAL');
    const sent = everythingSent(result);
    expect(sent).not.toContain('password_hash');
    expect(sent).not.toContain('SELECT');
    expect(sent).not.toContain('/srv/app');
    expect(sent).not.toContain(err.stack!.split('\n')[1].trim());
    const { status, info } = statusDetails(result.metadata);
    expect(status).toMatchObject({ code: grpc.status.INTERNAL, message: 'internal error' });
    expect(info.reason).toBe('INTERNAL');

    const logged = lines.find((l) => (l.level as number) >= 50);
    expect(logged).toBeDefined();
    const loggedErr = logged!.err as { message: string; stack: string };
    expect(loggedErr.message).toBe(secret);
    expect(loggedErr.stack).toContain('grpc-status.test.ts');
  });

  it('turns a thrown non-Error value into INTERNAL too', () => {
    const { log } = capturingLogger();
    const result = toServiceError('SELECT 1', log);
    expect(result.code).toBe(grpc.status.INTERNAL);
    expect(result.details).toBe('internal error');
    expect(everythingSent(result)).not.toContain('SELECT');
  });

  it('turns a busy SQLite database into UNAVAILABLE with reason DATABASE_UNAVAILABLE, hiding the driver message', () => {
    const { log } = capturingLogger();
    const err = Object.assign(new Error('SQLITE_BUSY: database is locked (/var/lib/billing.db)'), { code: 'SQLITE_BUSY' });
    const result = toServiceError(err, log);
    expect(result.code).toBe(grpc.status.UNAVAILABLE);
    expect(trailer(result.metadata, 'billing-error-reason')).toBe('DATABASE_UNAVAILABLE');
    expect(everythingSent(result)).not.toContain('SQLITE_BUSY');
    expect(everythingSent(result)).not.toContain('/var/lib');
    const { status, info } = statusDetails(result.metadata);
    expect(status.code).toBe(grpc.status.UNAVAILABLE);
    expect(info).toEqual({ reason: 'DATABASE_UNAVAILABLE', domain: 'billing.v1', metadata: {} });
  });

  it('turns an ORM lock-wait timeout into UNAVAILABLE with reason DATABASE_UNAVAILABLE', () => {
    const { log } = capturingLogger();
    const result = toServiceError(new LockWaitTimeoutException(new Error('lock wait timeout on wallets')), log);
    expect(result.code).toBe(grpc.status.UNAVAILABLE);
    expect(trailer(result.metadata, 'billing-error-reason')).toBe('DATABASE_UNAVAILABLE');
    expect(everythingSent(result)).not.toContain('wallets');
  });
});
