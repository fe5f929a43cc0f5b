// The emails the bank sent the customer, newest first.
import type { JSX } from "preact";

import { type Notification, call, pageQuery } from "../api";
import { ErrorBox, Heading, Pager, usePaged, when } from "../ui";

async function listNotifications(pageToken: string) {
  const answer = await call<{ notifications?: Notification[]; next_page_token?: string }>(
    "GET", `/v1/notifications?${pageQuery(pageToken)}`);
  return { items: answer.notifications ?? [], nextToken: answer.next_page_token ?? "" };
}

const KIND: Record<string, string> = {
  EMAIL_VERIFICATION: "Email verification",
  TRANSFER_SENT: "Money sent",
  TRANSFER_RECEIVED: "Money received",
  DEPOSIT: "Deposit",
  WITHDRAWAL: "Withdrawal",
  PASSWORD_RESET: "Password reset",
  PASSWORD_CHANGED: "Password changed",
  EMAIL_CHANGED: "Email changed",
  HOLD_RELEASED: "Hold released",
};

export function Notifications(): JSX.Element {
  const list = usePaged(listNotifications, "notifications");
  return (
    <section aria-busy={list.loading}>
      <Heading>Notifications</Heading>
      <p class="toolbar">
        <button type="button" onClick={list.reload}>Refresh</button>
      </p>
      <ErrorBox error={list.error} />
      {list.page && list.page.items.length === 0 ? <p>No notifications yet.</p> : null}
      {list.page && list.page.items.length > 0 ? (
        <table class="notifications">
          <caption>Page {list.pageNumber}, newest first</caption>
          <thead>
            <tr>
              <th scope="col">Date</th>
              <th scope="col">What</th>
              <th scope="col">Subject</th>
              <th scope="col">Sent to</th>
              <th scope="col">Status</th>
            </tr>
          </thead>
          <tbody>
            {list.page.items.map((n) => (
              <tr key={n.notification_id}>
                <td>{when(n.create_time)}</td>
                <td>{KIND[n.kind] ?? n.kind}</td>
                <td>{n.subject}</td>
                <td>{n.recipient}</td>
                <td>{n.status}</td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
      <Pager label="Notification pages" hasPrevious={list.hasPrevious} nextToken={list.page?.nextToken ?? ""} onPrevious={list.previous}
        onNext={list.next} />
    </section>
  );
}
