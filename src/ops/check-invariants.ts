/**
 * `npm run check-invariants [-- path/to/billing.db]`: checks the money
 * invariants (src/ops/invariants.ts) of the service's database and prints a
 * report. The database is the service's own (DB_PATH or DATABASE_URL, read by
 * loadConfig); a path argument names a SQLite file instead (a backup, say).
 *
 * It only reads. It never creates a file and never migrates: a database
 * without the billing schema, or with migrations not applied, is reported.
 * Exit codes: 0 every invariant holds, 1 violations, 2 the check could not run.
 */
import * as fs from 'node:fs';
import type { DatabaseConfig } from '../config';
import { ConfigError, loadConfig } from '../config';
import { openDatabase, type Database } from '../db/database';
import { createLogger } from '../shared/logger';
import { formatMoney } from '../shared/money';
import { checkInvariants, describeSchemaProblem, INVARIANT_RULES, type InvariantReport } from './invariants';

const EXIT_OK = 0;
const EXIT_VIOLATIONS = 1;
const EXIT_ERROR = 2;

const USAGE = 'usage: check-invariants [path/to/billing.db]   (default: the DB_PATH or DATABASE_URL of the service)\n';

const out = (text: string) => process.stdout.write(text + '\n');
const err = (text: string) => process.stderr.write(`check-invariants: ${text}\n`);

/** Where the check runs, without a password. */
function describeDatabase(db: DatabaseConfig): string {
  if (db.kind === 'sqlite') return `SQLite ${db.path}`;
  try {
    const url = new URL(db.url);
    return `PostgreSQL ${url.host}${url.pathname}`;
  } catch {
    return 'PostgreSQL (DATABASE_URL)';
  }
}

function printReport(report: InvariantReport): void {
  const c = report.counts;
  const r = c.billingRecords;
  const u = c.usageLogs;
  out(`users ${c.users} (${c.deletedUsers} deleted), wallets ${c.wallets}, total balance ${formatMoney(c.totalBalance)}`);
  out(`ledger: ${c.credits} credits (${formatMoney(c.creditTotal)}), ${c.debits} debits (${formatMoney(c.debitTotal)})`);
  out(`billing records: ${r.PAID} PAID, ${r.PENDING} PENDING, ${r.FAILED} FAILED; ${c.lineItems} line items`);
  out(`usage entries: ${u.BILLED} BILLED, ${u.PENDING} PENDING, ${u.REJECTED} REJECTED`);
  out(`rules checked: ${Object.keys(INVARIANT_RULES).length}`);
  if (report.ok) {
    out('OK: every invariant holds');
    return;
  }
  const broken = new Set(report.violations.map((v) => v.rule));
  out(`FAILED: ${report.violations.length} violations of ${broken.size} rules`);
  for (const rule of broken) {
    out(`  ${rule}: ${INVARIANT_RULES[rule]}`);
    for (const v of report.violations.filter((x) => x.rule === rule)) out(`    - ${v.detail}`);
  }
}

export async function main(args: readonly string[]): Promise<number> {
  if (args.length > 1 || args.some((a) => a.startsWith('-'))) {
    process.stderr.write(USAGE);
    return EXIT_ERROR;
  }
  let database: DatabaseConfig;
  try {
    database = args[0] ? { kind: 'sqlite', path: args[0] } : loadConfig().database;
  } catch (e) {
    if (e instanceof ConfigError) {
      err(`invalid configuration: ${e.message}`);
      return EXIT_ERROR;
    }
    throw e;
  }
  // Opening a missing SQLite file would create an empty one.
  if (database.kind === 'sqlite' && !fs.statSync(database.path, { throwIfNoEntry: false })?.isFile()) {
    err(`no database file at ${database.path}`);
    return EXIT_ERROR;
  }
  out(`checking ${describeDatabase(database)}`);
  let db: Database | undefined;
  try {
    db = await openDatabase(database, createLogger('silent'), { migrate: false });
    const problem = await describeSchemaProblem(db);
    if (problem) {
      err(problem);
      return EXIT_ERROR;
    }
    const report = await checkInvariants(db);
    printReport(report);
    return report.ok ? EXIT_OK : EXIT_VIOLATIONS;
  } catch (e) {
    err(`the check could not run: ${(e as Error)?.message ?? String(e)}`);
    return EXIT_ERROR;
  } finally {
    await db?.close().catch(() => undefined);
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (e: unknown) => {
      err(`unexpected failure: ${(e as Error)?.stack ?? String(e)}`);
      process.exitCode = EXIT_ERROR;
    },
  );
}
