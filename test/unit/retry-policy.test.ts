import { nextAttemptDelayMs, type RetryPolicy } from '../../src/billing/retry-policy';

const DEFAULT: RetryPolicy = { retryBaseDelayMs: 1000, maxRetries: 5 };

/** Delays after attempts 1, 2, ... until the policy says stop (null), bounded to 100 steps. */
function schedule(policy: RetryPolicy): number[] {
  const delays: number[] = [];
  for (let attempts = 1; attempts <= 100; attempts++) {
    const d = nextAttemptDelayMs(policy, attempts);
    if (d === null) return delays;
    delays.push(d);
  }
  throw new Error('the policy never stops retrying');
}

describe('nextAttemptDelayMs', () => {
  it('waits 1, 2, 4, 8, 16 s after failed attempts 1..5 with the default policy', () => {
    expect([1, 2, 3, 4, 5].map((n) => nextAttemptDelayMs(DEFAULT, n))).toEqual([1000, 2000, 4000, 8000, 16000]);
  });

  it('gives up after attempt 6 with the default policy: 6 attempts in all', () => {
    expect(nextAttemptDelayMs(DEFAULT, 6)).toBeNull();
    expect(nextAttemptDelayMs(DEFAULT, 7)).toBeNull();
    // 5 retries scheduled + the first attempt
    expect(schedule(DEFAULT).length + 1).toBe(6);
  });

  it('doubles from a custom base for a custom number of retries', () => {
    expect(schedule({ retryBaseDelayMs: 250, maxRetries: 3 })).toEqual([250, 500, 1000]);
    expect(schedule({ retryBaseDelayMs: 1, maxRetries: 10 })).toEqual([1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
  });

  it('never retries when maxRetries is 0', () => {
    expect(nextAttemptDelayMs({ retryBaseDelayMs: 1000, maxRetries: 0 }, 1)).toBeNull();
    expect(schedule({ retryBaseDelayMs: 1000, maxRetries: 0 })).toEqual([]);
  });

  it.each([0, -1])('throws a RangeError for attempts = %i', (attempts) => {
    expect(() => nextAttemptDelayMs(DEFAULT, attempts)).toThrow(RangeError);
  });
});
