import * as grpc from '@grpc/grpc-js';
import { BillingServiceService } from '../../generated/billing/v1/billing_service';
import { JobServiceService } from '../../generated/billing/v1/job_service';
import { UsageServiceService } from '../../generated/billing/v1/usage_service';
import { UserServiceService } from '../../generated/billing/v1/user_service';
import { WalletServiceService } from '../../generated/billing/v1/wallet_service';
import { MONEY_MOVING_METHODS, rpcLogLevel } from '../../src/grpc/rpc-log';

/** Every RPC of billing.v1 by the name the adapter logs ('/billing.v1.WalletService/AddFunds' -> 'AddFunds'). */
const RPC_NAMES = [UserServiceService, WalletServiceService, BillingServiceService, JobServiceService, UsageServiceService].flatMap((service) =>
  Object.values(service).map((method) => method.path.slice(method.path.lastIndexOf('/') + 1)),
);

describe('MONEY_MOVING_METHODS', () => {
  it('names RPCs that exist, by names unique across the billing services', () => {
    expect(new Set(RPC_NAMES).size).toBe(RPC_NAMES.length);
    for (const name of MONEY_MOVING_METHODS) expect(RPC_NAMES).toContain(name);
  });

  it('holds the calls that move money or change whether an account can be billed, and no read', () => {
    expect([...MONEY_MOVING_METHODS].sort()).toEqual(
      [
        'CreateUser',
        'SuspendUser',
        'ActivateUser',
        'DeleteUser',
        'AddFunds',
        'CreateBillingRecord',
        'ProcessBillingRecord',
        'ProcessLogs',
        'ProcessRetries',
        'ProcessAll',
        'StreamUsage',
      ].sort(),
    );
  });
});

describe('rpcLogLevel', () => {
  const { OK, NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, UNAUTHENTICATED, PERMISSION_DENIED, INTERNAL, UNAVAILABLE } =
    grpc.status;

  it.each<[string, string, grpc.status, boolean, boolean, string]>([
    // [what, method, code, refused, accessLog, level]
    ['a read', 'GetBalance', OK, false, false, 'debug'],
    ['a read of a missing user', 'GetUser', NOT_FOUND, false, false, 'debug'],
    ['a list', 'ListBillingRecords', OK, false, false, 'debug'],
    ['an UpdateUser (no money, no status)', 'UpdateUser', OK, false, false, 'debug'],
    ['a call refused for its token', 'GetBalance', UNAUTHENTICATED, true, false, 'debug'],
    ['a money-moving call refused for its role', 'SuspendUser', PERMISSION_DENIED, true, false, 'debug'],
    ['an AddFunds', 'AddFunds', OK, false, false, 'info'],
    ['an invalid AddFunds (it reached its handler)', 'AddFunds', INVALID_ARGUMENT, false, false, 'info'],
    ['a short ProcessBillingRecord', 'ProcessBillingRecord', FAILED_PRECONDITION, false, false, 'info'],
    ['a ProcessLogs', 'ProcessLogs', OK, false, false, 'info'],
    ['a read failing inside', 'GetBalance', INTERNAL, false, false, 'error'],
    ['a read with the database down', 'GetUser', UNAVAILABLE, false, false, 'error'],
    ['a read, access log on', 'GetBalance', OK, false, true, 'info'],
    ['a refused call, access log on', 'GetBalance', UNAUTHENTICATED, true, true, 'info'],
    ['a server fault, access log on', 'AddFunds', INTERNAL, false, true, 'error'],
  ])('%s: %s %s (refused %s, access log %s) -> %s', (_what, method, code, refused, accessLog, level) => {
    expect(rpcLogLevel({ method, code, refused }, accessLog)).toBe(level);
  });
});
