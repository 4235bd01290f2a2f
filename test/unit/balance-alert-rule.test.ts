import { alertBand, alertEvents, nextAlertState, type AlertState } from '../../src/wallets/balance-alert-rule';

const T = 10_000_000n; // 10.00

describe('alertBand', () => {
  it.each<[bigint, bigint, AlertState]>([
    [T, T, 'OK'],
    [T + 1n, T, 'OK'],
    [T - 1n, T, 'LOW'],
    [1n, T, 'LOW'],
    [0n, T, 'DEPLETED'],
    [-5n, T, 'DEPLETED'],
    // Threshold 0: no low band.
    [1n, 0n, 'OK'],
    [0n, 0n, 'DEPLETED'],
  ])('available %s against threshold %s is %s', (available, threshold, state) => {
    expect(alertBand(available, threshold)).toBe(state);
  });
});

describe('nextAlertState', () => {
  it.each<[AlertState, bigint, AlertState]>([
    ['OK', T, 'OK'],
    ['OK', T - 1n, 'LOW'],
    ['OK', 0n, 'DEPLETED'],
    ['LOW', T - 1n, 'LOW'],
    ['LOW', T, 'OK'],
    ['LOW', -1n, 'DEPLETED'],
    // Back above zero but still low: stays DEPLETED (no second balance.depleted at the next zero).
    ['DEPLETED', 1n, 'DEPLETED'],
    ['DEPLETED', T - 1n, 'DEPLETED'],
    ['DEPLETED', T, 'OK'],
  ])('from %s at %s is %s', (from, available, to) => {
    expect(nextAlertState(from, available, T)).toBe(to);
  });

  it('recovers with threshold 0 only above zero', () => {
    expect(nextAlertState('DEPLETED', 0n, 0n)).toBe('DEPLETED');
    expect(nextAlertState('DEPLETED', 1n, 0n)).toBe('OK');
  });
});

describe('alertEvents', () => {
  const types = (from: AlertState, to: AlertState, threshold = T) => alertEvents(7, from, to, 3n, threshold).map((e) => e.type);

  it.each<[AlertState, AlertState, string[]]>([
    ['OK', 'OK', []],
    ['LOW', 'LOW', []],
    ['DEPLETED', 'DEPLETED', []],
    ['OK', 'LOW', ['balance.low']],
    ['OK', 'DEPLETED', ['balance.low', 'balance.depleted']],
    ['LOW', 'DEPLETED', ['balance.depleted']],
    ['LOW', 'OK', ['balance.recovered']],
    ['DEPLETED', 'OK', ['balance.recovered']],
  ])('%s -> %s writes %j', (from, to, expected) => {
    expect(types(from, to)).toEqual(expected);
  });

  it('OK -> DEPLETED with threshold 0 writes only balance.depleted (there is no low band to cross)', () => {
    expect(types('OK', 'DEPLETED', 0n)).toEqual(['balance.depleted']);
  });

  it('carries the user, the available balance and the threshold', () => {
    expect(alertEvents(7, 'OK', 'DEPLETED', -2n, T)).toEqual([
      { type: 'balance.low', userId: 7, refId: null, payload: { availableBalance: -2n, threshold: T } },
      { type: 'balance.depleted', userId: 7, refId: null, payload: { availableBalance: -2n } },
    ]);
    expect(alertEvents(7, 'LOW', 'OK', T, T)).toEqual([{ type: 'balance.recovered', userId: 7, refId: null, payload: { availableBalance: T, threshold: T } }]);
  });
});
