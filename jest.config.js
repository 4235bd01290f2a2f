/**
 * `npm test` runs the unit tests once and the integration suite twice: on
 * SQLite (the embedded default) and on PostgreSQL (TEST_DATABASE=postgres,
 * one fresh database per test app, see test/helpers/database.ts).
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
      ...base,
      displayName: 'postgres',
      testMatch: ['<rootDir>/test/integration/**/*.test.ts'],
      setupFiles: ['<rootDir>/test/helpers/use-postgres.ts'],
    },
  ],
};
