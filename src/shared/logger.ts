import pino, { type Logger } from 'pino';

/**
 * JSON logs on stdout. pino serializes bigint safely; credentials are redacted
 * wherever they would appear.
 */
export function createLogger(level: string): Logger {
  return pino({
    level,
    base: { service: 'billing-service' },
    redact: { paths: ['authorization', '*.authorization', 'token', '*.token'], censor: '[redacted]' },
    timestamp: pino.stdTimeFunctions.isoTime,
  });
}
