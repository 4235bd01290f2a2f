/**
 * The retry schedule. Attempt 1 is the charge at creation; when attempt n
 * fails and n <= maxRetries, retry n is due base x 2^(n-1) later (1 s, 2 s,
 * 4 s, 8 s, 16 s by default). When attempt maxRetries + 1 (the last retry)
 * fails, the record is FAILED: 1 + maxRetries attempts in all.
 */
export interface RetryPolicy {
  retryBaseDelayMs: number;
  maxRetries: number;
}

/** After `attempts` failed attempts: when the next is due, or null when none is left. */
export function nextAttemptDelayMs(policy: RetryPolicy, attempts: number): number | null {
  if (attempts < 1) throw new RangeError('attempts starts at 1');
  if (attempts > policy.maxRetries) return null;
  return policy.retryBaseDelayMs * 2 ** (attempts - 1);
}
