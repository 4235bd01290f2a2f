/**
 * `npm test` runs the unit tests once and the integration suite twice: on
 * SQLite (the embedded default) and on PostgreSQL (TEST_DATABASE=postgres,
 * one fresh database per test app, see test/helpers/database.ts); and the
 * usage suites a third time on SQLite with the usage writer thread.
 * Benchmarks under test/bench are not tests.
 */
const base = {
  preset: 'ts-jest',
  testEnvironment: 'node',
  testPathIgnorePatterns: ['/node_modules/', '/test/bench/'],
};

/** @type {import('jest').Config} */
module.exports = {
  testTimeout: 60000,
  projects: [
    { ...base, displayName: 'unit', testMatch: ['<rootDir>/test/unit/**/*.test.ts'] },
    { ...base, displayName: 'sqlite', testMatch: ['<rootDir>/test/integration/**/*.test.ts'] },
    {
      // The usage suites again, with usage (batches and ingestion runs) written by the usage writer thread, the
      // service's default on SQLite.
      ...base,
      displayName: 'sqlite-thread',
      testMatch: [
        '<rootDir>/test/integration/usage-*.test.ts',
        '<rootDir>/test/integration/{balance-alerts,ingestion,ingestion-chunks,jobs,concurrency,events-emit,hostile}.test.ts',
      ],
      testPathIgnorePatterns: [...base.testPathIgnorePatterns, '/usage-crash\\.test\\.ts$'],
      setupFiles: ['<rootDir>/test/helpers/use-usage-thread.ts'],
    },
    {
      ...base,
      displayName: 'postgres',
      testMatch: ['<rootDir>/test/integration/**/*.test.ts'],
      setupFiles: ['<rootDir>/test/helpers/use-postgres.ts'],
    },
  ],
};
