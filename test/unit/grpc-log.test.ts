import { redactGrpcMessage } from '../../src/grpc/grpc-log';

const TOKEN = '0123456789abcdef0123456789abcdef';

describe('redactGrpcMessage (grpc-js log messages before they reach pino)', () => {
  it.each([
    [
      'a dropped header (metadata.js)',
      `Failed to add metadata entry authorization: Bearer\t${TOKEN}. Metadata string value "Bearer\t${TOKEN}" contains illegal characters. For more information see https://github.com/grpc/grpc-node/issues/1173`,
      'Failed to add metadata entry authorization: [redacted]',
    ],
    [
      'a dropped header with a non-breaking space',
      `Failed to add metadata entry x-api-key: ${TOKEN}\u00a0. Metadata string value "${TOKEN}\u00a0" contains illegal characters.`,
      'Failed to add metadata entry x-api-key: [redacted]',
    ],
    [
      'the server_call trace of request headers',
      `2026-12-02T00:06:22.563Z | v1.14.7 1 | server_call | Request to /billing.v1.UserService/GetUser received headers {"te":["trailers"],"authorization":["Bearer ${TOKEN}"]}`,
      '2026-12-02T00:06:22.563Z | v1.14.7 1 | server_call | Request to /billing.v1.UserService/GetUser received headers {"te":"[redacted]","authorization":"[redacted]"}',
    ],
    ['an authorization value in any other shape', `sending metadata authorization: Bearer ${TOKEN}\nnext`, 'sending metadata authorization: [redacted]\nnext'],
    ['a bare bearer credential', `details: bearer\u00a0${TOKEN}, more`, 'details: bearer [redacted], more'],
  ])('%s', (_what, message, expected) => {
    expect(redactGrpcMessage(message)).toBe(expected);
  });

  it('leaves messages without header values alone', () => {
    const text = 'Connection to dns:127.0.0.1:50051 rejected by server because of excess pings. Increasing ping interval to 60000 ms';
    expect(redactGrpcMessage(text)).toBe(text);
  });
});
