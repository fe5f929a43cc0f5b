// Sending money. The request_id (the API's idempotency key) belongs to one submission of the
// form: a double click, or "Send" again after the answer was lost, carries the same key, so the
// bank moves the money once. Editing the form, a success or a definite refusal starts a new one.
import type { JSX } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";

import { type Account, type Transfer, call, newRequestId, pageQuery, retryable } from "../api";
import { AmountError, currencyDigits, formatMoney, parseAmount } from "../money";
import { ErrorBox, Field, Heading, Notice } from "../ui";

export function SendMoney({ fromAccountId }: { fromAccountId: string }): JSX.Element {
  const [accounts, setAccounts] = useState<Account[] | null>(null);
  const [from, setFrom] = useState(fromAccountId);
  const [to, setTo] = useState("");
  const [amount, setAmount] = useState("");
  const [description, setDescription] = useState("");
  const [error, setError] = useState<unknown>(null);
  const [sent, setSent] = useState<Transfer | null>(null);
  const [busy, setBusy] = useState(false);
  const requestId = useRef(newRequestId());
  const inFlight = useRef(false);

  useEffect(() => {
    call<{ accounts?: Account[] }>("GET", `/v1/accounts?${pageQuery("", 500)}`)
      .then((answer) => {
        const active = (answer.accounts ?? []).filter((a) => a.status === "ACTIVE");
        setAccounts(active);
        setFrom((current) => (active.some((a) => a.account_id === current) ? current : active[0]?.account_id ?? ""));
      })
      .catch(setError);
  }, []);

  const source = accounts?.find((a) => a.account_id === from);
  const currency = source?.currency ?? "";
  // A changed form is a new submission: a new key.
  const edit = (set: (value: string) => void) => (value: string) => {
    set(value);
    requestId.current = newRequestId();
  };

  const submit = async (event: Event) => {
    event.preventDefault();
    if (inFlight.current) return; // the second click of a double click
    setError(null);
    setSent(null);
    if (!source) {
      setError(new Error("Choose the account to send from."));
      return;
    }
    let minor: bigint;
    try {
      minor = parseAmount(amount, currency);
    } catch (e) {
      setError(e instanceof AmountError ? e : new Error(String(e)));
      return;
    }
    inFlight.current = true;
    setBusy(true);
    try {
      const transfer = await call<Transfer>("POST", "/v1/transfers", {
        request_id: requestId.current,
        from_account_id: source.account_id,
        to_account_id: to.trim(),
        amount: minor.toString(),
        currency,
        description: description.trim(),
      });
      setSent(transfer);
      setTo("");
      setAmount("");
      setDescription("");
      requestId.current = newRequestId();
      const refreshed = await call<Account>("GET", `/v1/accounts/${encodeURIComponent(source.account_id)}`).catch(() => null);
      if (refreshed) setAccounts((list) => list?.map((a) => (a.account_id === refreshed.account_id ? refreshed : a)) ?? list);
    } catch (e) {
      if (!retryable(e)) requestId.current = newRequestId();
      setError(e);
    } finally {
      inFlight.current = false;
      setBusy(false);
    }
  };

  return (
    <section>
      <Heading>Send money</Heading>
      {sent ? (
        <Notice>
          <p>
            Sent <strong>{formatMoney(sent.amount, sent.currency)}</strong> to <code>{sent.to_account_id}</code>. Transfer{" "}
            <code>{sent.transfer_id}</code>, {sent.status.toLowerCase()}.
          </p>
        </Notice>
      ) : null}
      {accounts && accounts.length === 0 ? <p>You have no active account to send from. <a href="#/accounts">Open one</a>.</p> : null}
      <form onSubmit={submit} noValidate>
        <div class="field">
          <label for="from">From account</label>
          <select id="from" name="from" value={from} onChange={(e) => edit(setFrom)((e.currentTarget as HTMLSelectElement).value)}>
            {(accounts ?? []).map((a) => (
              <option key={a.account_id} value={a.account_id}>
                {a.currency} {a.account_id}: {formatMoney(a.available_balance, a.currency)} available
              </option>
            ))}
          </select>
        </div>
        <Field id="to" label="To account number" required autoComplete="off" spellcheck={false}
          hint="The recipient's account number, from their Accounts page" value={to} onValue={edit(setTo)} />
        <Field id="amount" label={currency ? `Amount in ${currency}` : "Amount"} inputMode="decimal" autoComplete="off" required
          hint={currency ? (currencyDigits(currency) > 0 ? `Up to ${currencyDigits(currency)} decimals, e.g. 12.${"5".repeat(currencyDigits(currency))}` : "Whole units, e.g. 1234") : undefined}
          value={amount} onValue={edit(setAmount)} />
        <Field id="description" label="Description (optional)" maxLength={140} autoComplete="off" value={description}
          onValue={edit(setDescription)} />
        <ErrorBox error={error} />
        <button type="submit" disabled={busy || !accounts}>{busy ? "Sending…" : "Send"}</button>
      </form>
    </section>
  );
}
