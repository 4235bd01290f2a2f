// jest setup file of the "sqlite-thread" project: the apps the harness starts write usage batches on the usage
// writer thread (compiled: dist/), as the service does by default; the "sqlite" project runs them inline.
process.env.TEST_USAGE_WRITER = 'thread';
