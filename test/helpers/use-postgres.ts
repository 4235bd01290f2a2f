// jest setup file of the "postgres" project: the integration suite runs on PostgreSQL.
process.env.TEST_DATABASE = 'postgres';
