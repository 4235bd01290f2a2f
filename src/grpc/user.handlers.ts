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
    createUser: unary<pb.CreateUserRequest, pb.CreateUserResponse>('CreateUser', async (req, { em }) => {
      const user = await users.create(em, { email: req.email, name: req.name, requestId: req.requestId });
      return { user: userToPb(user) };
    }),

    getUser: unary<pb.GetUserRequest, pb.GetUserResponse>('GetUser', async (req, { em }) => {
      const user = await users.get(em, toId(req.id, 'id'));
      return { user: userToPb(user) };
    }),

    listUsers: unary<pb.ListUsersRequest, pb.ListUsersResponse>('ListUsers', async (req, { em }) => {
      const status = parseUserStatusFilter(req.status);
      const page = await users.list(em, pageRequest(req), status);
      return { users: page.items.map(userToPb), nextPageToken: page.nextPageToken };
    }),

    updateUser: unary<pb.UpdateUserRequest, pb.UpdateUserResponse>('UpdateUser', async (req, { em }) => {
      const user = await users.update(em, toId(req.id, 'id'), { email: req.email, name: req.name });
      return { user: userToPb(user) };
    }),

    deleteUser: unary<pb.DeleteUserRequest, pb.DeleteUserResponse>('DeleteUser', async (req, { em }) => {
      await users.delete(em, toId(req.id, 'id'));
      return {};
    }),

    suspendUser: unary<pb.SuspendUserRequest, pb.SuspendUserResponse>('SuspendUser', async (req, { em }) => {
      const user = await users.suspend(em, toId(req.id, 'id'), req.reason);
      return { user: userToPb(user) };
    }),

    activateUser: unary<pb.ActivateUserRequest, pb.ActivateUserResponse>('ActivateUser', async (req, { em }) => {
      const user = await users.activate(em, toId(req.id, 'id'));
      return { user: userToPb(user) };
    }),
  };
}
