import fc from 'fast-check';
import { decideCharge, type ChargeableRecord, type ChargeTrigger } from '../../src/billing/charge-decision';

const policy = { retryBaseDelayMs: 1000, maxRetries: 5 };
const now = new Date('2026-01-01T00:00:00Z');
const at = (ms: number) => new Date(now.getTime() + ms);

const pending = (attemptCount: number, amount = 5_000_000n, nextAttemptAt: Date | null = now): ChargeableRecord => ({
  status: 'PENDING',
  amount,
  attemptCount,
  nextAttemptAt,
});
const failed = (attemptCount = 6, amount = 5_000_000n): ChargeableRecord => ({ status: 'FAILED', amount, attemptCount, nextAttemptAt: null });
const paid: ChargeableRecord = { status: 'PAID', amount: 5_000_000n, attemptCount: 1, nextAttemptAt: null };

describe('decideCharge', () => {
  it('a new record the wallet covers is charged as attempt 1', () => {
    expect(decideCharge(pending(0), 5_000_000n, policy, 'new', now)).toEqual({ action: 'CHARGE', attemptCount: 1 });
  });

  it('a new record that is short is retried 1 s later as attempt 1', () => {
    expect(decideCharge(pending(0), 4_999_999n, policy, 'new', now)).toEqual({ action: 'RETRY', attemptCount: 1, nextAttemptAt: at(1000) });
  });

  it('the short attempts 1-5 schedule retries at +1, +2, +4, +8, +16 s; the short attempt 6 fails and suspends', () => {
    const schedule = [0, 1, 2, 3, 4].map((n) => decideCharge(pending(n), 0n, policy, n === 0 ? 'new' : 'retry', now));
    expect(schedule).toEqual([1000, 2000, 4000, 8000, 16000].map((d, i) => ({ action: 'RETRY', attemptCount: i + 1, nextAttemptAt: at(d) })));
    expect(decideCharge(pending(5), 0n, policy, 'retry', now)).toEqual({ action: 'FAIL', attemptCount: 6, suspendUser: true });
  });

  it('MAX_RETRIES 0: the first short attempt fails at once', () => {
    expect(decideCharge(pending(0), 0n, { ...policy, maxRetries: 0 }, 'new', now)).toEqual({ action: 'FAIL', attemptCount: 1, suspendUser: true });
  });

  it('a record of amount 0 is charged whatever the balance, even with a closed wallet', () => {
    expect(decideCharge(pending(0, 0n), 0n, policy, 'new', now)).toEqual({ action: 'CHARGE', attemptCount: 1 });
    expect(decideCharge(pending(0, 0n), null, policy, 'new', now)).toEqual({ action: 'CHARGE', attemptCount: 1 });
  });

  it('a closed wallet (null balance) never pays a record with an amount', () => {
    expect(decideCharge(pending(0), null, policy, 'new', now).action).toBe('RETRY');
    expect(decideCharge(failed(), null, policy, 'settle', now)).toEqual({ action: 'SKIP' });
  });

  it('PAID is final for every trigger', () => {
    for (const trigger of ['new', 'retry', 'manual', 'settle'] as ChargeTrigger[]) {
      expect(decideCharge(paid, 10n ** 12n, policy, trigger, now)).toEqual({ action: 'ALREADY_PAID' });
    }
  });

  it('"new" skips a record whose first attempt was already made (by the scheduler, say)', () => {
    expect(decideCharge(pending(1), 10n ** 12n, policy, 'new', now)).toEqual({ action: 'SKIP' });
  });

  it('"retry" skips a record that is not due yet, is not PENDING, or has no schedule', () => {
    expect(decideCharge(pending(1, 5_000_000n, at(1)), 10n ** 12n, policy, 'retry', now)).toEqual({ action: 'SKIP' });
    expect(decideCharge(failed(), 10n ** 12n, policy, 'retry', now)).toEqual({ action: 'SKIP' });
    expect(decideCharge(pending(1, 5_000_000n, null), 10n ** 12n, policy, 'retry', now)).toEqual({ action: 'SKIP' });
    expect(decideCharge(pending(1, 5_000_000n, now), 10n ** 12n, policy, 'retry', now)).toEqual({ action: 'CHARGE', attemptCount: 2 });
  });

  it('"manual" charges now whatever the schedule, and counts the attempt', () => {
    expect(decideCharge(pending(2, 5_000_000n, at(60_000)), 5_000_000n, policy, 'manual', now)).toEqual({ action: 'CHARGE', attemptCount: 3 });
    expect(decideCharge(pending(2, 5_000_000n, at(60_000)), 0n, policy, 'manual', now)).toEqual({
      action: 'RETRY',
      attemptCount: 3,
      nextAttemptAt: at(4000),
    });
  });

  it('"manual" on a FAILED record counts the attempt and leaves it FAILED while short, without suspending again', () => {
    expect(decideCharge(failed(6), 1n, policy, 'manual', now)).toEqual({ action: 'FAIL', attemptCount: 7, suspendUser: false });
    expect(decideCharge(failed(6), 5_000_000n, policy, 'manual', now)).toEqual({ action: 'CHARGE', attemptCount: 7 });
  });

  it('"settle" pays what fits without counting an attempt, and changes nothing otherwise', () => {
    expect(decideCharge(failed(6), 5_000_000n, policy, 'settle', now)).toEqual({ action: 'CHARGE', attemptCount: 6 });
    expect(decideCharge(pending(3, 5_000_000n, at(5000)), 5_000_000n, policy, 'settle', now)).toEqual({ action: 'CHARGE', attemptCount: 3 });
    expect(decideCharge(failed(6), 4_999_999n, policy, 'settle', now)).toEqual({ action: 'SKIP' });
  });

  it('properties: never charges more than the balance, counts at most one attempt, and settles never suspend', () => {
    const status = fc.constantFrom<ChargeableRecord['status']>('PENDING', 'PAID', 'FAILED');
    const trigger = fc.constantFrom<ChargeTrigger>('new', 'retry', 'manual', 'settle');
    fc.assert(
      fc.property(
        status,
        fc.bigInt(0n, 10n ** 9n),
        fc.integer({ min: 0, max: 10 }),
        fc.option(fc.integer({ min: -5000, max: 5000 })),
        fc.option(fc.bigInt(0n, 10n ** 9n)),
        fc.integer({ min: 0, max: 8 }),
        trigger,
        (st, amount, attempts, dueIn, balance, maxRetries, trig) => {
          const record = { status: st, amount, attemptCount: attempts, nextAttemptAt: dueIn === null ? null : at(dueIn) };
          const d = decideCharge(record, balance, { retryBaseDelayMs: 1000, maxRetries }, trig, now);
          if (d.action === 'CHARGE') expect(amount === 0n || (balance !== null && balance >= amount)).toBe(true);
          if (d.action !== 'ALREADY_PAID' && d.action !== 'SKIP') {
            expect(d.attemptCount - attempts).toBe(trig === 'settle' ? 0 : 1);
          }
          if (trig === 'settle') expect(['ALREADY_PAID', 'SKIP', 'CHARGE']).toContain(d.action);
          if (st === 'PAID') expect(d.action).toBe('ALREADY_PAID');
          if (d.action === 'RETRY') expect(d.nextAttemptAt.getTime()).toBeGreaterThan(now.getTime());
        },
      ),
    );
  });
});
