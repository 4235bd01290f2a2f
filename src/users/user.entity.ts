import { EntitySchema } from '@mikro-orm/core';
import { EpochMsType } from '../db/types';

export type UserStatus = 'ACTIVE' | 'SUSPENDED';

export class User {
  id!: number;
  email: string;
  name: string;
  status: UserStatus = 'ACTIVE';
  suspensionReason = '';
  /** True when the service itself suspended the user for an unpaid record; settling reactivates them. */
  suspendedForNonPayment = false;
  deletedAt: Date | null = null;
  createdAt: Date;
  updatedAt: Date;

  constructor(email: string, name: string, now: Date) {
    this.email = email;
    this.name = name;
    this.createdAt = now;
    this.updatedAt = now;
  }
}

export const UserSchema = new EntitySchema<User>({
  class: User,
  tableName: 'users',
  properties: {
    id: { type: 'number', primary: true, autoincrement: true },
    email: { type: 'string' },
    name: { type: 'string' },
    status: { type: 'string' },
    suspensionReason: { type: 'string' },
    suspendedForNonPayment: { type: 'boolean' },
    deletedAt: { type: EpochMsType, nullable: true },
    createdAt: { type: EpochMsType },
    updatedAt: { type: EpochMsType },
  },
});
