import { Migration20261124000000Initial } from './Migration20261124000000_initial';

/** Every migration, in order. Listed here so that compiled code and ts-jest find them alike. */
export const migrationsList = [{ name: 'Migration20261124000000_initial', class: Migration20261124000000Initial }];
