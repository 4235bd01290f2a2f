/**
 * No token reaches any output, whatever the client sends: the built service
 * runs as a process and everything it writes (stdout and stderr) is searched.
 * grpc-js drops a header value it cannot hold as metadata (a tab, a
 * non-breaking space) and used to print "Failed to add metadata entry
 * authorization: Bearer <token>" to stderr; with GRPC_TRACE it prints every
 * request's headers. And a header that is there but unusable is
 * MALFORMED_TOKEN, not MISSING_TOKEN.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import pino from 'pino';
import * as userPb from '../../generated/billing/v1/user_service';
import { createTestDatabase, type TestDatabase } from '../helpers/database';
import { startTestApp } from '../helpers/harness';
import { rawUnary } from '../helpers/h2';
import { killServiceProcesses, startServiceProcess, type ServiceProcess } from '../helpers/service-process';

const TOKEN = randomBytes(32).toString('hex');
const UNAUTHENTICATED = 16;
const GET_USER = userPb.UserServiceService.getUser.path;
const getUser = (id: bigint) => userPb.GetUserRequest.encode({ id }).finish();

/** Every way the output could carry the token, or enough of it to matter. */
function expectNoToken(output: string): void {
  for (const piece of [TOKEN, TOKEN.slice(0, 16), TOKEN.slice(-16), TOKEN.toUpperCase().slice(0, 16)]) {
    expect(output.includes(piece) ? `output contains ${piece.length} characters of the token` : 'clean').toBe('clean');
  }
}

const MALFORMED: [string, string][] = [
  ['a tab after Bearer', `Bearer\t${TOKEN}`],
  ['a non-breaking space after the token', `Bearer ${TOKEN}\u00a0`],
  ['a non-breaking space after Bearer', `Bearer\u00a0${TOKEN}`],
];

describe('tokens never reach the output of the service process', () => {
  let dir: string;
  let db: TestDatabase;
  let tokensFile: string;
  let svc: ServiceProcess | undefined;

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-leaks-'));
    db = await createTestDatabase(dir);
    tokensFile = path.join(dir, 'tokens.json');
    fs.writeFileSync(tokensFile, JSON.stringify([{ name: 'checkout', token: TOKEN, role: 'service' }]), { mode: 0o600 });
  });

  afterEach(async () => {
    svc?.close();
    svc = undefined;
    await killServiceProcesses();
    await db.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function start(env: Record<string, string>): Promise<ServiceProcess> {
    svc = await startServiceProcess({
      GRPC_PORT: '0',
      ...db.env,
      INGEST_CRON: 'off',
      LOG_FILE_PATH: path.join(dir, 'none.json'),
      AUTH_TOKENS_FILE: tokensFile,
      ...env,
    });
    return svc;
  }

  /** SIGTERM, wait for the exit, and return everything the process wrote. */
  async function stopAndRead(s: ServiceProcess): Promise<string> {
    s.child.kill('SIGTERM');
    expect(await s.exit).toEqual({ code: 0, signal: null });
    return s.output();
  }

  it.each(MALFORMED)('answers a header with %s with UNAUTHENTICATED/MALFORMED_TOKEN and never prints the token', async (_what, value) => {
    // The access log on, so the refusal itself is logged too (refused calls are quiet by default).
    const s = await start({ LOG_LEVEL: 'info', ACCESS_LOG: 'true' });
    const outcome = await rawUnary(`127.0.0.1:${s.port}`, GET_USER, { authorization: value }, getUser(1n));
    const output = await stopAndRead(s);
    expect({ status: outcome.status, reason: outcome.reason, tokenInOutput: output.includes(TOKEN) }).toEqual({
      status: UNAUTHENTICATED,
      reason: 'MALFORMED_TOKEN',
      tokenInOutput: false,
    });
    // Non-vacuous: the refusal was logged, and so was the dropped header (without its value).
    expect(output).toContain('"reason":"MALFORMED_TOKEN"');
    expect(output).toContain('"header":"authorization"');
    expectNoToken(output);
  });

  it('with LOG_LEVEL=debug and grpc-js tracing everything (GRPC_TRACE=all), still prints no token, valid or not', async () => {
    const s = await start({ LOG_LEVEL: 'debug', GRPC_TRACE: 'all', GRPC_VERBOSITY: 'DEBUG' });
    const address = `127.0.0.1:${s.port}`;
    const valid = await rawUnary(address, GET_USER, { authorization: `Bearer ${TOKEN}` }, getUser(1n));
    const refused: (string | undefined)[] = [];
    for (const [, value] of MALFORMED) refused.push((await rawUnary(address, GET_USER, { authorization: value }, getUser(1n))).reason);
    const output = await stopAndRead(s);
    expect({ valid: valid.reason, refused, tokenInOutput: output.includes(TOKEN) }).toEqual({
      valid: 'USER_NOT_FOUND', // admitted: there is no user 1
      refused: MALFORMED.map(() => 'MALFORMED_TOKEN'),
      tokenInOutput: false,
    });
    // Non-vacuous: grpc-js's traces of the request headers are in the log, with the values redacted.
    expect(output).toMatch(/received headers/);
    expect(output).toContain('"grpc":true');
    expectNoToken(output);
  });
});

describe('AUTH_TOKENS_FILE permissions', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-perms-'));
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  async function securityWarnings(mode: number): Promise<Record<string, unknown>[]> {
    const file = path.join(tmp, `tokens-${mode.toString(8)}.json`);
    fs.writeFileSync(file, JSON.stringify([{ name: 'checkout', token: TOKEN, role: 'service' }]));
    fs.chmodSync(file, mode); // explicit: the umask does not decide the test
    const lines: Record<string, unknown>[] = [];
    const log = pino({ level: 'trace' }, { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) });
    const t = await startTestApp({ AUTH_TOKENS_FILE: file }, { log });
    await t.stop();
    return lines.filter((l) => l.level === 40 && l.security === true);
  }

  it('warns at start-up (security) when the tokens file is readable by group or others (0644), naming the file and the mode', async () => {
    const warnings = await securityWarnings(0o644);
    expect(warnings).toHaveLength(1);
    expect(String(warnings[0].msg)).toContain('AUTH_TOKENS_FILE');
    expect(warnings[0]).toMatchObject({ mode: '0644' });
  });

  it('warns for group-writable (0620) too', async () => {
    expect(await securityWarnings(0o620)).toHaveLength(1);
  });

  it('does not warn for 0600 or 0400', async () => {
    expect(await securityWarnings(0o600)).toEqual([]);
    expect(await securityWarnings(0o400)).toEqual([]);
  });
});
