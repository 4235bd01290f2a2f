/** UserService: protobuf in, one UsersService call, protobuf out. */
import type { UsersService } from '../users/users.service';
import { toId } from '../shared/ids';
import * as pb from '../../generated/billing/v1/user_service';
import type { Unary } from './adapter';
import { pageRequest, parseUserStatusFilter, userToPb } from './convert';

export interface UserHandlersDeps {
  unary: Unary;
  users: UsersService;
}

export function createUserHandlers({ unary, users }: UserHandlersDeps): pb.UserServiceServer {
  return {
    createUser: unary<pb.CreateUserRequest, pb.CreateUserResponse>('CreateUser', async (req, ctx) => {
      const user = await users.create(ctx, { email: req.email, name: req.name, requestId: req.requestId });
      return { user: userToPb(user) };
    }),

    getUser: unary<pb.GetUserRequest, pb.GetUserResponse>('GetUser', async (req, ctx) => {
      const user = await users.get(ctx, toId(req.id, 'id'));
      return { user: userToPb(user) };
    }),

    listUsers: unary<pb.ListUsersRequest, pb.ListUsersResponse>('ListUsers', async (req, ctx) => {
      const status = parseUserStatusFilter(req.status);
      const page = await users.list(ctx, pageRequest(req), status);
      return { users: page.items.map(userToPb), nextPageToken: page.nextPageToken };
    }),

    updateUser: unary<pb.UpdateUserRequest, pb.UpdateUserResponse>('UpdateUser', async (req, ctx) => {
      const user = await users.update(ctx, toId(req.id, 'id'), { email: req.email, name: req.name });
      return { user: userToPb(user) };
    }),

    deleteUser: unary<pb.DeleteUserRequest, pb.DeleteUserResponse>('DeleteUser', async (req, ctx) => {
      await users.delete(ctx, toId(req.id, 'id'));
      return {};
    }),

    suspendUser: unary<pb.SuspendUserRequest, pb.SuspendUserResponse>('SuspendUser', async (req, ctx) => {
      const user = await users.suspend(ctx, toId(req.id, 'id'), req.reason);
      return { user: userToPb(user) };
    }),

    activateUser: unary<pb.ActivateUserRequest, pb.ActivateUserResponse>('ActivateUser', async (req, ctx) => {
      const user = await users.activate(ctx, toId(req.id, 'id'));
      return { user: userToPb(user) };
    }),
  };
}
