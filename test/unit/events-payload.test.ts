import { decodePayload, encodePayload } from '../../src/events/events.repository';
import { cursorOf } from '../../src/events/events.types';

describe('event payloads', () => {
  it('keep money exact past 2^53 and instants to the millisecond through the stored JSON', () => {
    const payload = { billingRecordId: 7, attemptCount: 2, nextAttemptTime: new Date(1_700_000_000_123), reason: 'INSUFFICIENT_FUNDS' };
    expect(decodePayload(encodePayload(payload))).toEqual(payload);
    const money = { transactionId: 3, amount: 9_223_372_036_854_775_807n, balanceAfter: 0n, requestId: 'r-1' };
    const text = encodePayload(money);
    expect(text).toBe('{"transactionId":3,"amount":"9223372036854775807","balanceAfter":"0","requestId":"r-1"}');
    expect(decodePayload(text)).toEqual(money);
  });

  it('cursors are zero-padded ids: ordered as numbers and as strings alike', () => {
    expect(cursorOf(42)).toBe('0000000000000042');
    const ids = [1, 9, 10, 99, 100, 123456789];
    const cursors = ids.map(cursorOf);
    expect([...cursors].sort()).toEqual(cursors);
  });
});
