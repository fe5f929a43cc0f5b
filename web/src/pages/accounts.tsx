// The customer's accounts with their balances, opening one, and an account's statement with its
// pending holds.
import type { JSX } from "preact";
import { useState } from "preact/hooks";

import { type Account, type Activity, SUPPORTED_CURRENCIES, type Transfer, call, pageQuery } from "../api";
import { formatMoney } from "../money";
import { ErrorBox, Heading, Notice, Pager, usePaged, useSubmit, when } from "../ui";
import { PendingHolds, pendingHolds } from "./holds";

async function listAccounts(pageToken: string) {
  const answer = await call<{ accounts?: Account[]; next_page_token?: string }>("GET", `/v1/accounts?${pageQuery(pageToken, 50)}`);
  return { items: answer.accounts ?? [], nextToken: answer.next_page_token ?? "" };
}

function OpenAccount({ onOpened }: { onOpened: (account: Account) => void }): JSX.Element {
  const [currency, setCurrency] = useState("EUR");
  const { error, busy, submit } = useSubmit(async () => {
    onOpened(await call<Account>("POST", "/v1/accounts", { currency }));
  });
  return (
    <form class="inline" onSubmit={submit} aria-labelledby="open-account-title">
      <h2 id="open-account-title">Open an account</h2>
      <div class="field">
        <label for="currency">Currency</label>
        <select id="currency" name="currency" value={currency} onChange={(e) => setCurrency((e.currentTarget as HTMLSelectElement).value)}>
          {SUPPORTED_CURRENCIES.map((c) => (
            <option key={c} value={c}>
              {c}
            </option>
          ))}
        </select>
      </div>
      <button type="submit" disabled={busy}>Open account</button>
      <ErrorBox error={error} />
    </form>
  );
}

export function Accounts(): JSX.Element {
  const list = usePaged(listAccounts, "accounts");
  const [opened, setOpened] = useState<Account | null>(null);
  return (
    <section aria-busy={list.loading}>
      <Heading>Your accounts</Heading>
      <p class="toolbar">
        <button type="button" onClick={list.reload}>Refresh</button>
      </p>
      {opened ? <Notice><p>Opened a {opened.currency} account, number {opened.account_id}.</p></Notice> : null}
      <ErrorBox error={list.error} />
      {list.page && list.page.items.length === 0 ? <p>You have no accounts yet.</p> : null}
      {list.page && list.page.items.length > 0 ? (
        <table class="accounts">
          <caption class="visually-hidden">Your accounts and their balances</caption>
          <thead>
            <tr>
              <th scope="col">Account</th>
              <th scope="col">Currency</th>
              <th scope="col" class="money">Balance</th>
              <th scope="col" class="money">Available</th>
              <th scope="col">Status</th>
              <th scope="col"><span class="visually-hidden">Actions</span></th>
            </tr>
          </thead>
          <tbody>
            {list.page.items.map((a) => (
              <tr key={a.account_id} data-account-id={a.account_id}>
                <td><code>{a.account_id}</code></td>
                <td>{a.currency}</td>
                <td class="money balance">{formatMoney(a.balance, a.currency)}</td>
                <td class="money">{formatMoney(a.available_balance, a.currency)}</td>
                <td>{a.status}</td>
                <td class="actions">
                  <a href={`#/accounts/${encodeURIComponent(a.account_id)}`}>Statement<span class="visually-hidden"> of {a.account_id}</span></a>
                  {a.status === "ACTIVE" ? (
                    <a href={`#/transfer?from=${encodeURIComponent(a.account_id)}`}>Send money<span class="visually-hidden"> from {a.account_id}</span></a>
                  ) : null}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
      {list.hasPrevious || list.page?.nextToken ? (
        <Pager label="More accounts" hasPrevious={list.hasPrevious} nextToken={list.page?.nextToken ?? ""} onPrevious={list.previous}
          onNext={list.next} />
      ) : null}
      <OpenAccount onOpened={(account) => { setOpened(account); list.reload(); }} />
    </section>
  );
}

export function AccountStatement({ accountId }: { accountId: string }): JSX.Element {
  const [account, setAccount] = useState<Account | null>(null);
  const [holds, setHolds] = useState<Transfer[]>([]);
  const [accountError, setAccountError] = useState<unknown>(null);
  const [settled, setSettled] = useState<string | null>(null);
  const statement = usePaged(async (pageToken: string) => {
    // The balances, the holds and the statement read together, so the page shows one moment's picture.
    const [loaded, pending, answer] = await Promise.all([
      call<Account>("GET", `/v1/accounts/${encodeURIComponent(accountId)}`),
      pendingHolds(accountId),
      call<{ activities?: Activity[]; next_page_token?: string }>(
        "GET", `/v1/accounts/${encodeURIComponent(accountId)}/activity?${pageQuery(pageToken)}`),
    ]);
    setAccount(loaded);
    setHolds(pending);
    setAccountError(null);
    return { items: answer.activities ?? [], nextToken: answer.next_page_token ?? "" };
  }, accountId);
  return (
    <section aria-busy={statement.loading}>
      <Heading>Statement</Heading>
      {settled ? <Notice><p>{settled}</p></Notice> : null}
      <ErrorBox error={accountError ?? statement.error} />
      {account ? (
        <dl class="summary">
          <dt>Account</dt>
          <dd><code>{account.account_id}</code></dd>
          <dt>Balance</dt>
          <dd class="balance">{formatMoney(account.balance, account.currency)}</dd>
          <dt>Available</dt>
          <dd class="available">{formatMoney(account.available_balance, account.currency)}</dd>
          <dt>Status</dt>
          <dd>{account.status}</dd>
        </dl>
      ) : null}
      <p class="toolbar">
        <button type="button" onClick={statement.reload}>Refresh</button>
        {account?.status === "ACTIVE" ? <a href={`#/transfer?from=${encodeURIComponent(accountId)}`}>Send money from this account</a> : null}
      </p>
      {account ? (
        <PendingHolds accountId={accountId} holds={holds} onSettled={(message) => { setSettled(message); statement.reload(); }} />
      ) : null}
      <h2>Movements</h2>
      <p class="hint">Statements are written a moment after each transfer: a new line may take a few seconds to appear.</p>
      {statement.page && statement.page.items.length === 0 ? <p>No movements yet.</p> : null}
      {statement.page && statement.page.items.length > 0 && account ? (
        <table class="statement">
          <caption>Page {statement.pageNumber}, newest first</caption>
          <thead>
            <tr>
              <th scope="col">Date</th>
              <th scope="col">Description</th>
              <th scope="col">Counterparty</th>
              <th scope="col" class="money">Amount</th>
              <th scope="col" class="money">Balance after</th>
            </tr>
          </thead>
          <tbody>
            {statement.page.items.map((line) => (
              <tr key={line.activity_id} data-transfer-id={line.transfer_id}>
                <td>{when(line.create_time)}</td>
                <td>{line.description || line.kind}</td>
                <td>{line.counterparty_account_id ? <code>{line.counterparty_account_id}</code> : "Simple Bank"}</td>
                <td class="money amount">{formatMoney(line.amount, line.currency || account.currency)}</td>
                <td class="money">{formatMoney(line.balance_after, line.currency || account.currency)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
      <Pager label="Statement pages" hasPrevious={statement.hasPrevious} nextToken={statement.page?.nextToken ?? ""}
        onPrevious={statement.previous} onNext={statement.next} />
    </section>
  );
}
