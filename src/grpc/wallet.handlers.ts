/** WalletService: protobuf in, one WalletsService call, protobuf out. */
import type { WalletsService } from '../wallets/wallets.service';
import { toId } from '../shared/ids';
import { moneyToMicros } from '../shared/money';
import * as pb from '../../generated/billing/v1/wallet_service';
import type { Unary } from './adapter';
import { money, pageRequest, walletToPb, walletTransactionToPb } from './convert';

export interface WalletHandlersDeps {
  unary: Unary;
  wallets: WalletsService;
  /** The deployment's currency (ISO 4217). */
  currency: string;
}

export function createWalletHandlers({ unary, wallets, currency }: WalletHandlersDeps): pb.WalletServiceServer {
  return {
    getWallet: unary<pb.GetWalletRequest, pb.GetWalletResponse>('GetWallet', async (req, { em }) => {
      const wallet = await wallets.getWallet(em, toId(req.userId, 'user_id'));
      return { wallet: walletToPb(wallet, currency) };
    }),

    getBalance: unary<pb.GetBalanceRequest, pb.GetBalanceResponse>('GetBalance', async (req, { em }) => {
      const balance = await wallets.getBalance(em, toId(req.userId, 'user_id'));
      return { balance: money(balance, currency) };
    }),

    addFunds: unary<pb.AddFundsRequest, pb.AddFundsResponse>('AddFunds', async (req, { em }) => {
      const userId = toId(req.userId, 'user_id');
      const amount = moneyToMicros(req.amount, currency, 'amount');
      const result = await wallets.addFunds(em, userId, amount, req.requestId);
      return {
        wallet: walletToPb(result.wallet, currency),
        transaction: walletTransactionToPb(result.transaction, currency),
        settledBillingRecordIds: result.settledRecordIds.map((id) => BigInt(id)),
      };
    }),

    listWalletTransactions: unary<pb.ListWalletTransactionsRequest, pb.ListWalletTransactionsResponse>(
      'ListWalletTransactions',
      async (req, { em }) => {
        const page = await wallets.listTransactions(em, toId(req.userId, 'user_id'), pageRequest(req));
        return {
          transactions: page.items.map((t) => walletTransactionToPb(t, currency)),
          nextPageToken: page.nextPageToken,
        };
      },
    ),
  };
}
