// A forgotten password: ask for a reset code by email, then set a new password with it (API.md,
// "Account recovery"). The bank answers the request the same way whether or not the address is
// registered, and so does this page.
import type { JSX } from "preact";
import { useState } from "preact/hooks";

import { publicCall } from "../api";
import { ErrorBox, Field, Heading, Notice, navigate, useSubmit } from "../ui";

// From the first step to the second, in memory only.
const pending = { email: "" };
// Shown once on the sign-in page after a reset.
export const afterReset = { done: false };

export function ForgotPassword(): JSX.Element {
  const [email, setEmail] = useState("");
  const { error, busy, submit } = useSubmit(async () => {
    await publicCall("POST", "/v1/credentials:requestPasswordReset", { email: email.trim() });
    pending.email = email.trim();
    navigate("/reset");
  });
  return (
    <section>
      <Heading>Forgot your password?</Heading>
      <p>Enter the email address of your profile: we will send it a code to set a new password.</p>
      <form onSubmit={submit} noValidate>
        <Field id="email" label="Email address" type="email" autoComplete="email" required value={email} onValue={setEmail} />
        <ErrorBox error={error} />
        <button type="submit" disabled={busy}>Send reset code</button>
      </form>
      <p>
        <a href="#/signin">Back to sign in</a>
      </p>
    </section>
  );
}

export function ResetPassword(): JSX.Element {
  const [email, setEmail] = useState(pending.email);
  const [code, setCode] = useState("");
  const [password, setPassword] = useState("");
  const { error, busy, submit } = useSubmit(async () => {
    await publicCall("POST", "/v1/credentials:resetPassword", { email: email.trim(), code: code.trim(), new_password: password });
    pending.email = "";
    afterReset.done = true;
    navigate("/signin");
  });
  return (
    <section>
      <Heading>Set a new password</Heading>
      <Notice>
        <p>
          If {pending.email ? <strong>{pending.email}</strong> : "the address"} belongs to a Simple Bank profile, a reset code is on
          its way there. It works once, for 15 minutes. Setting a new password signs you out everywhere.
        </p>
      </Notice>
      <form onSubmit={submit} noValidate>
        <Field id="email" label="Email address" type="email" autoComplete="email" required value={email} onValue={setEmail} />
        <Field id="code" label="Reset code" inputMode="numeric" autoComplete="one-time-code" required value={code} onValue={setCode} />
        <Field id="new-password" label="New password" type="password" autoComplete="new-password" required
          hint="A long passphrase is best" value={password} onValue={setPassword} />
        <ErrorBox error={error} />
        <button type="submit" disabled={busy}>Set new password</button>
      </form>
      <p>
        No code? <a href="#/forgot">Ask for another</a>
      </p>
    </section>
  );
}
