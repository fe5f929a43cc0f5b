// The public REST API (../shared/API.md) on the page's own origin, and the session's tokens.
//
// The tokens live in this module's memory only: never in localStorage, sessionStorage or a
// cookie, so no other script run and no other tab can read them, and they are gone when the tab
// closes or reloads (a reload asks to sign in again). docs/decisions/0017 says why.

export interface FieldViolation {
  field: string;
  description: string;
}

/** A google.rpc.Status answer, as the API sends it: its message is what the person reads. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly reason: string | null,
    readonly violations: FieldViolation[],
  ) {
    super(message);
  }
}

/** No answer at all: the request may or may not have been carried out. */
export class NetworkError extends Error {}

interface StatusBody {
  code?: number;
  message?: string;
  details?: Array<{ "@type"?: string; reason?: string; field_violations?: FieldViolation[] }>;
}

interface SessionBody {
  session_id: string;
  customer_id: string;
  access_token: string;
  access_token_expire_time: string;
  refresh_token: string;
  refresh_token_expire_time: string;
}

interface Session {
  sessionId: string;
  customerId: string;
  accessToken: string;
  refreshToken: string;
  /** When the access token is renewed: before it expires, by a margin (ms since the epoch). */
  renewAt: number;
}

// Renew this long before the access token expires (a quarter of its life when that is shorter),
// so a request in flight never carries a token that lapses on the way.
const RENEW_MARGIN_MS = 60_000;
// Bounds on what the page waits for: one request, and a timer (setTimeout's own limit).
const REQUEST_TIMEOUT_MS = 15_000;
const TIMER_MAX_MS = 2_147_483_647;
// Never renew more often than this, whatever the clocks say.
const RENEW_DELAY_MIN_MS = 5_000;

let session: Session | null = null;
let renewing: Promise<void> | null = null;
let renewTimer: ReturnType<typeof setTimeout> | undefined;
type Listener = (signedIn: boolean, why: string | null) => void;
const listeners = new Set<Listener>();

export function onSessionChange(listener: Listener): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

export function signedIn(): boolean {
  return session !== null;
}

export function customerId(): string {
  return session?.customerId ?? "";
}

function adopt(answer: Answer<SessionBody>, previous: Session | null): void {
  const body = answer.body;
  // The token's life as the bank counts it (its expiry minus the bank's Date header), laid on
  // this machine's clock: a browser clock that is off by minutes neither renews too late nor
  // renews in a loop.
  const now = Date.now();
  const bankNow = Date.parse(answer.date);
  const life = Date.parse(body.access_token_expire_time) - (Number.isNaN(bankNow) ? now : bankNow);
  const delay = Math.min(TIMER_MAX_MS, Math.max(RENEW_DELAY_MIN_MS, life - Math.min(RENEW_MARGIN_MS, life / 4)));
  session = {
    sessionId: body.session_id || previous?.sessionId || "",
    customerId: body.customer_id || previous?.customerId || "",
    accessToken: body.access_token,
    refreshToken: body.refresh_token,
    renewAt: now + delay,
  };
  clearTimeout(renewTimer);
  renewTimer = setTimeout(() => {
    renew().catch(() => undefined); // renew() ends the session itself when the bank refuses
  }, delay);
}

function end(why: string | null): void {
  clearTimeout(renewTimer);
  const was = session !== null;
  session = null;
  renewing = null;
  if (was) listeners.forEach((listener) => listener(false, why));
}

/** One refresh at a time: a second concurrent one would present a rotated refresh token, which
 * the bank takes for a stolen copy and answers by revoking the session. */
function renew(): Promise<void> {
  if (renewing) return renewing;
  const current = session;
  if (!current) return Promise.reject(new ApiError(401, "You are not signed in.", null, []));
  renewing = (async () => {
    try {
      const answer = await exchange<SessionBody>("POST", "/v1/sessions:refresh", { refresh_token: current.refreshToken }, null);
      if (session === current) adopt(answer, current);
    } catch (error) {
      // A refusal ends the session (revoked, expired); a network failure keeps it for a retry.
      if (error instanceof ApiError && session === current) end(error.message);
      throw error;
    } finally {
      renewing = null;
    }
  })();
  return renewing;
}

interface Answer<T> {
  body: T;
  /** The response's Date header: the bank's clock. */
  date: string;
}

async function send<T>(method: string, path: string, body: unknown, token: string | null): Promise<T> {
  return (await exchange<T>(method, path, body, token)).body;
}

async function exchange<T>(method: string, path: string, body: unknown, token: string | null): Promise<Answer<T>> {
  const headers: Record<string, string> = { accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token) headers.authorization = `Bearer ${token}`;
  let response: Response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
  } catch (error) {
    throw new NetworkError(`The bank could not be reached (${error instanceof Error ? error.message : String(error)}).`);
  }
  const text = await response.text();
  let parsed: unknown = null;
  try {
    parsed = text ? JSON.parse(text) : {};
  } catch {
    parsed = null;
  }
  if (response.ok && parsed !== null) return { body: parsed as T, date: response.headers.get("date") ?? "" };
  const status = (parsed ?? {}) as StatusBody;
  const details = Array.isArray(status.details) ? status.details : [];
  const reason = details.find((d) => d["@type"]?.endsWith("google.rpc.ErrorInfo"))?.reason ?? null;
  const violations = details.flatMap((d) => (d["@type"]?.endsWith("google.rpc.BadRequest") ? d.field_violations ?? [] : []));
  throw new ApiError(response.status, status.message || `The bank answered HTTP ${response.status}.`, reason, violations);
}

/** A call without a session (registration, verification, sign-in). */
export function publicCall<T>(method: string, path: string, body?: unknown): Promise<T> {
  return send<T>(method, path, body, null);
}

/** A call with the session's access token, renewed first when it is due; on a 401 the token is
 * renewed once and the call made again (every call here is safe to repeat: a refused one did
 * nothing, and a transfer carries its idempotency key). */
export async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  if (!session) throw new ApiError(401, "You are not signed in.", null, []);
  if (Date.now() >= session.renewAt) await renew();
  const token = session?.accessToken ?? null;
  try {
    return await send<T>(method, path, body, token);
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 401 || !session) throw error;
    if (session.accessToken === token) await renew();
    return send<T>(method, path, body, session?.accessToken ?? null);
  }
}

export async function signIn(username: string, password: string): Promise<void> {
  adopt(await exchange<SessionBody>("POST", "/v1/sessions", { username, password }, null), null);
  listeners.forEach((listener) => listener(true, null));
}

/** Revokes the session at the bank, then forgets its tokens whatever the answer. */
export async function signOut(): Promise<void> {
  const current = session;
  if (!current) return;
  try {
    await call("DELETE", `/v1/sessions/${encodeURIComponent(current.sessionId)}`);
  } finally {
    end(null);
  }
}

/** A fresh idempotency key (the API's request_id): one per form submission. */
export function newRequestId(): string {
  return crypto.randomUUID();
}

/** An answer after which the same submission may be sent again, with the same request_id:
 * nothing came back, or the bank asked to retry. Any other answer settles the submission. */
export function retryable(error: unknown): boolean {
  return !(error instanceof ApiError) || error.status >= 500 || error.status === 429;
}

// --- the resources, as API.md gives them -----------------------------------------------------

export interface Customer {
  customer_id: string;
  email: string;
  full_name: string;
  email_verified: boolean;
}

export interface Account {
  account_id: string;
  customer_id: string;
  currency: string;
  balance: string;
  /** balance minus the account's pending holds as payer: what can be spent. */
  available_balance: string;
  status: string;
  create_time: string;
}

export interface Activity {
  activity_id: string;
  transfer_id: string;
  kind: string;
  amount: string;
  currency: string;
  balance_after: string;
  counterparty_account_id: string;
  description: string;
  create_time: string;
}

/** PENDING: a hold, its money reserved on the payer's account until it is posted (COMPLETED),
 * voided (VOIDED) or lapses (EXPIRED). A plain transfer is COMPLETED from the start. */
export type TransferStatus = "COMPLETED" | "PENDING" | "VOIDED" | "EXPIRED";

export interface Transfer {
  transfer_id: string;
  request_id: string;
  from_account_id: string;
  to_account_id: string;
  /** A hold not posted: the held amount; a posted one: the amount moved. */
  amount: string;
  currency: string;
  description: string;
  status: TransferStatus;
  create_time: string;
  /** Holds only: the amount reserved when it was placed, and when it lapses. */
  held_amount?: string;
  expire_time?: string;
}

export interface Notification {
  notification_id: string;
  kind: string;
  channel: string;
  recipient: string;
  subject: string;
  status: string;
  create_time: string;
}

export const SUPPORTED_CURRENCIES = ["EUR", "USD", "GBP", "JPY"];
export const PAGE_SIZE = 10;

export function pageQuery(pageToken: string, pageSize = PAGE_SIZE): string {
  const query = new URLSearchParams({ page_size: String(pageSize) });
  if (pageToken) query.set("page_token", pageToken);
  return query.toString();
}
