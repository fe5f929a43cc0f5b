// An account's pending holds (API.md "Holds"): money reserved on a payer's account, not moved yet.
// The payee takes it (all or part: "Take payment", POST :post) or lets it go ("Release", POST
// :void); the payer sees what is held and until when. Each button's request_id belongs to one
// click and the retries of it (a lost answer, a 5xx): the bank settles the hold once. A success,
// a definite refusal or a changed amount starts a new one, as the transfer form does.
import type { JSX } from "preact";
import { useRef, useState } from "preact/hooks";

import { type Transfer, call, newRequestId, retryable } from "../api";
import { AmountError, formatAmount, formatMoney, parseAmount } from "../money";
import { ErrorBox, when } from "../ui";

// The holds are found among the account's newest movements (API.md has no status filter yet).
export const HOLDS_SCANNED_MAX = 500;

export async function pendingHolds(accountId: string): Promise<Transfer[]> {
  const answer = await call<{ transfers?: Transfer[] }>(
    "GET", `/v1/accounts/${encodeURIComponent(accountId)}/transfers?page_size=${HOLDS_SCANNED_MAX}`);
  return (answer.transfers ?? []).filter((t) => t.status === "PENDING");
}

function held(hold: Transfer): string {
  return hold.held_amount ?? hold.amount;
}

function IncomingHold({ hold, onSettled }: { hold: Transfer; onSettled: (message: string) => void }): JSX.Element {
  const [amount, setAmount] = useState(formatAmount(held(hold), hold.currency));
  const [error, setError] = useState<unknown>(null);
  const [busy, setBusy] = useState(false);
  const postKey = useRef(newRequestId());
  const voidKey = useRef(newRequestId());
  const inFlight = useRef(false);

  const settle = async (key: { current: string }, action: () => Promise<string>) => {
    if (inFlight.current) return; // the second click of a double click
    inFlight.current = true;
    setBusy(true);
    setError(null);
    try {
      const message = await action();
      key.current = newRequestId();
      onSettled(message);
    } catch (e) {
      if (!retryable(e)) key.current = newRequestId();
      setError(e);
    } finally {
      inFlight.current = false;
      setBusy(false);
    }
  };

  const take = async () => {
    let minor: bigint;
    try {
      minor = parseAmount(amount, hold.currency);
    } catch (e) {
      setError(e instanceof AmountError ? e : new Error(String(e)));
      return;
    }
    await settle(postKey, async () => {
      const posted = await call<Transfer>("POST", `/v1/transfers/${encodeURIComponent(hold.transfer_id)}:post`, {
        request_id: postKey.current,
        amount: minor.toString(),
      });
      const rest = BigInt(held(posted)) - BigInt(posted.amount);
      return `Took ${formatMoney(posted.amount, posted.currency)} from hold ${posted.transfer_id}` +
        (rest > 0n ? `; the other ${formatMoney(rest, posted.currency)} is released to the payer.` : ".");
    });
  };

  const release = () =>
    settle(voidKey, async () => {
      const voided = await call<Transfer>("POST", `/v1/transfers/${encodeURIComponent(hold.transfer_id)}:void`, {
        request_id: voidKey.current,
      });
      return `Released hold ${voided.transfer_id}: ${formatMoney(held(voided), voided.currency)} is the payer's again.`;
    });

  const amountId = `take-${hold.transfer_id}`;
  return (
    <tr data-transfer-id={hold.transfer_id}>
      <td><code>{hold.from_account_id}</code></td>
      <td>{hold.description}</td>
      <td class="money held">{formatMoney(held(hold), hold.currency)}</td>
      <td>{hold.expire_time ? when(hold.expire_time) : ""}</td>
      <td>
        <form class="hold" onSubmit={(e) => { e.preventDefault(); void take(); }} noValidate>
          <label for={amountId}>Amount to take<span class="visually-hidden"> from hold {hold.transfer_id}</span></label>
          <input id={amountId} name={amountId} inputMode="decimal" autoComplete="off" value={amount}
            onInput={(e) => { setAmount((e.currentTarget as HTMLInputElement).value); postKey.current = newRequestId(); }} />
          <button type="submit" disabled={busy}>Take payment</button>
          <button type="button" class="secondary" disabled={busy} onClick={() => void release()}>Release</button>
        </form>
        <ErrorBox error={error} />
      </td>
    </tr>
  );
}

/** The holds on this account, in and out; `onSettled` hears of a hold taken or released. */
export function PendingHolds({ accountId, holds, onSettled }: {
  accountId: string;
  holds: Transfer[];
  onSettled: (message: string) => void;
}): JSX.Element {
  const incoming = holds.filter((h) => h.to_account_id === accountId);
  const outgoing = holds.filter((h) => h.from_account_id === accountId);
  return (
    <>
      <h2>Pending holds</h2>
      {holds.length === 0 ? <p>No money is held to or from this account.</p> : null}
      {incoming.length > 0 ? (
        <table class="holds incoming">
          <caption>Held for you: take it, all or part, or release it before it lapses</caption>
          <thead>
            <tr>
              <th scope="col">From</th>
              <th scope="col">Description</th>
              <th scope="col" class="money">Held</th>
              <th scope="col">Lapses</th>
              <th scope="col">Take or release</th>
            </tr>
          </thead>
          <tbody>
            {incoming.map((h) => <IncomingHold key={h.transfer_id} hold={h} onSettled={onSettled} />)}
          </tbody>
        </table>
      ) : null}
      {outgoing.length > 0 ? (
        <table class="holds outgoing">
          <caption>Held from this account: not available to spend until taken, released or lapsed</caption>
          <thead>
            <tr>
              <th scope="col">To</th>
              <th scope="col">Description</th>
              <th scope="col" class="money">Held</th>
              <th scope="col">Lapses</th>
            </tr>
          </thead>
          <tbody>
            {outgoing.map((h) => (
              <tr key={h.transfer_id} data-transfer-id={h.transfer_id}>
                <td><code>{h.to_account_id}</code></td>
                <td>{h.description}</td>
                <td class="money held">{formatMoney(held(h), h.currency)}</td>
                <td>{h.expire_time ? when(h.expire_time) : ""}</td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
    </>
  );
}
