/**
 * Which RPC calls write their `rpc` log line, and at which level: the one
 * policy behind the adapter (calls that reach a handler) and the auth
 * interceptor (calls it refuses).
 *
 * At the default LOG_LEVEL=info a healthy service is quiet, and what an
 * operator must be able to reconstruct is still there:
 * - server faults (INTERNAL, UNAVAILABLE): error, always;
 * - the calls in MONEY_MOVING_METHODS, once admitted: info, whatever their
 *   outcome (OK or the error code and reason);
 * - everything else (reads, calls refused by authentication, invalid calls of
 *   other methods): debug, so not written at info.
 * ACCESS_LOG=true turns the access log on: every call at info (server faults
 * still at error).
 *
 * Job runs and charge outcomes are logged where they happen (src/jobs,
 * src/billing), whatever starts them.
 */
import * as grpc from '@grpc/grpc-js';

/**
 * The methods whose every admitted call is logged at info: those that move
 * money or change whether an account may be billed. Names as the handlers
 * register them with the adapter (unique across billing.v1).
 */
export const MONEY_MOVING_METHODS: ReadonlySet<string> = new Set([
  // UserService: an account that can be billed appears, is suspended, reactivated or deleted.
  'CreateUser',
  'SuspendUser',
  'ActivateUser',
  'DeleteUser',
  // WalletService: a credit, and the settlement of unpaid records it triggers.
  'AddFunds',
  // BillingService: a charge.
  'CreateBillingRecord',
  'ProcessBillingRecord',
  // UsageService: a stream of usage that becomes money (one line per stream; RecordUsage batches are not listed:
  // a busy producer would flood the log, and every batch's outcome is in its response).
  'StreamUsage',
  // JobService: a triggered run bills usage and charges wallets.
  'ProcessLogs',
  'ProcessRetries',
  'ProcessAll',
]);

const SERVER_FAULTS: ReadonlySet<grpc.status> = new Set([grpc.status.INTERNAL, grpc.status.UNAVAILABLE]);

export type RpcLogLevel = 'error' | 'info' | 'debug';

export interface RpcCall {
  /** The method name, e.g. "AddFunds". */
  method: string;
  code: grpc.status;
  /** True when authentication refused the call before its handler ran. */
  refused: boolean;
}

/** The level of a call's one `rpc` line. */
export function rpcLogLevel(call: RpcCall, accessLog: boolean): RpcLogLevel {
  if (SERVER_FAULTS.has(call.code)) return 'error';
  if (accessLog) return 'info';
  if (!call.refused && MONEY_MOVING_METHODS.has(call.method)) return 'info';
  return 'debug';
}
