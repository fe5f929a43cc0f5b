// Sending money. The request_id (the API's idempotency key) belongs to one submission of the
// form: a double click, or "Send" again after the answer was lost, carries the same key, so the
// bank moves the money once. Editing the form, a success or a definite refusal starts a new one.
// With "Hold for" minutes the transfer is a hold (API.md "Holds"): reserved, taken by the payee later.
import type { JSX } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";

import { type Account, type Transfer, call, newRequestId, pageQuery, retryable } from "../api";
import { currencyDigits, formatMoney, parseAmount } from "../money";
import { ErrorBox, Field, Heading, Notice, when } from "../ui";

// API.md's bounds on hold_seconds (60 to 604800), in minutes.
const HOLD_MINUTES_MAX = 7 * 24 * 60;

/** "" (no hold) or a whole number of minutes within API.md's bounds, as seconds. */
function holdSeconds(typed: string): number | undefined {
  const text = typed.trim();
  if (!text) return undefined;
  const minutes = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!(minutes >= 1 && minutes <= HOLD_MINUTES_MAX)) {
    throw new Error(`Hold for a whole number of minutes, 1 to ${HOLD_MINUTES_MAX}, or leave it empty to send now`);
  }
  return minutes * 60;
}

export function SendMoney({ fromAccountId }: { fromAccountId: string }): JSX.Element {
  const [accounts, setAccounts] = useState<Account[] | null>(null);
  const [from, setFrom] = useState(fromAccountId);
  const [to, setTo] = useState("");
  const [amount, setAmount] = useState("");
  const [description, setDescription] = useState("");
  const [holdMinutes, setHoldMinutes] = useState("");
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
    let hold: number | undefined;
    try {
      minor = parseAmount(amount, currency);
      hold = holdSeconds(holdMinutes);
    } catch (e) {
      setError(e instanceof Error ? e : new Error(String(e)));
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
        ...(hold === undefined ? {} : { hold_seconds: hold }),
      });
      setSent(transfer);
      setTo("");
      setAmount("");
      setDescription("");
      setHoldMinutes("");
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
          {sent.status === "PENDING" ? (
            <p>
              Held <strong>{formatMoney(sent.held_amount ?? sent.amount, sent.currency)}</strong> for{" "}
              <code>{sent.to_account_id}</code> until {sent.expire_time ? when(sent.expire_time) : "it lapses"}. Hold{" "}
              <code>{sent.transfer_id}</code>, pending.
            </p>
          ) : (
            <p>
              Sent <strong>{formatMoney(sent.amount, sent.currency)}</strong> to <code>{sent.to_account_id}</code>. Transfer{" "}
              <code>{sent.transfer_id}</code>, {sent.status.toLowerCase()}.
            </p>
          )}
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
        <Field id="hold" label="Hold for (minutes, optional)" inputMode="numeric" autoComplete="off" value={holdMinutes}
          hint="Reserve the money instead: the recipient takes it, all or part, or it is released after this long"
          onValue={edit(setHoldMinutes)} />
        <ErrorBox error={error} />
        <button type="submit" disabled={busy || !accounts}>{busy ? "Sending…" : "Send"}</button>
      </form>
    </section>
  );
}
