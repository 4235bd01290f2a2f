/** WalletService: protobuf in, one WalletsService call, protobuf out. */
import type { WalletsService } from '../wallets/wallets.service';
import { toId } from '../shared/ids';
import { moneyToMicros } from '../shared/money';
import * as pb from '../../generated/billing/v1/wallet_service';
import type { Unary } from './adapter';
import { balanceAlertToPb, money, pageRequest, walletToPb, walletTransactionToPb } from './convert';

export interface WalletHandlersDeps {
  unary: Unary;
  wallets: WalletsService;
  /** The deployment's currency (ISO 4217). */
  currency: string;
}

export function createWalletHandlers({ unary, wallets, currency }: WalletHandlersDeps): pb.WalletServiceServer {
  return {
    getWallet: unary<pb.GetWalletRequest, pb.GetWalletResponse>('GetWallet', async (req, ctx) => {
      const wallet = await wallets.getWallet(ctx, toId(req.userId, 'user_id'));
      return { wallet: walletToPb(wallet, currency) };
    }),

    getBalance: unary<pb.GetBalanceRequest, pb.GetBalanceResponse>('GetBalance', async (req, ctx) => {
      const { balance, available } = await wallets.getBalance(ctx, toId(req.userId, 'user_id'));
      return { balance: money(balance, currency), availableBalance: money(available, currency) };
    }),

    addFunds: unary<pb.AddFundsRequest, pb.AddFundsResponse>('AddFunds', async (req, ctx) => {
      const userId = toId(req.userId, 'user_id');
      const amount = moneyToMicros(req.amount, currency, 'amount');
      const result = await wallets.addFunds(ctx, userId, amount, req.requestId);
      return {
        wallet: walletToPb(result.wallet, currency),
        transaction: walletTransactionToPb(result.transaction, currency),
        settledBillingRecordIds: result.settledRecordIds.map((id) => BigInt(id)),
      };
    }),

    setBalanceAlert: unary<pb.SetBalanceAlertRequest, pb.SetBalanceAlertResponse>('SetBalanceAlert', async (req, ctx) => {
      const userId = toId(req.userId, 'user_id');
      const threshold = req.useDefault ? null : moneyToMicros(req.threshold, currency, 'threshold');
      return { alert: balanceAlertToPb(await wallets.setBalanceAlert(ctx, userId, threshold), currency) };
    }),

    getBalanceAlert: unary<pb.GetBalanceAlertRequest, pb.GetBalanceAlertResponse>('GetBalanceAlert', async (req, ctx) => {
      return { alert: balanceAlertToPb(await wallets.getBalanceAlert(ctx, toId(req.userId, 'user_id')), currency) };
    }),

    listWalletTransactions: unary<pb.ListWalletTransactionsRequest, pb.ListWalletTransactionsResponse>(
      'ListWalletTransactions',
      async (req, ctx) => {
        const page = await wallets.listTransactions(ctx, toId(req.userId, 'user_id'), pageRequest(req));
        return {
          transactions: page.items.map((t) => walletTransactionToPb(t, currency)),
          nextPageToken: page.nextPageToken,
        };
      },
    ),
  };
}
