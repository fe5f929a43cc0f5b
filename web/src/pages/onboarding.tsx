// Becoming a customer and signing in: register, enter the emailed code, create credentials, sign in.
import type { JSX } from "preact";
import { useState } from "preact/hooks";

import { type Customer, publicCall, signIn } from "../api";
import { ErrorBox, Field, Heading, Notice, navigate, useSubmit } from "../ui";
import { afterReset } from "./recovery";

// Carried from one step to the next in memory only: the enrollment token is a credential.
const pending: { email: string; enrollmentToken: string } = { email: "", enrollmentToken: "" };

export function Register(): JSX.Element {
  const [email, setEmail] = useState("");
  const [fullName, setFullName] = useState("");
  const [phone, setPhone] = useState("");
  const { error, busy, submit } = useSubmit(async () => {
    const body: Record<string, string> = { email: email.trim(), full_name: fullName.trim() };
    if (phone.trim()) body.phone_number = phone.trim();
    const customer = await publicCall<Customer>("POST", "/v1/customers", body);
    pending.email = customer.email;
    navigate(`/verify/${encodeURIComponent(customer.customer_id)}`);
  });
  return (
    <section>
      <Heading>Open your Simple Bank profile</Heading>
      <form onSubmit={submit} noValidate>
        <Field id="email" label="Email address" type="email" autoComplete="email" required value={email} onValue={setEmail} />
        <Field id="full-name" label="Full name" autoComplete="name" required value={fullName} onValue={setFullName} />
        <Field id="phone" label="Phone number (optional)" type="tel" autoComplete="tel" hint="International format, e.g. +44 20 7946 0000"
          value={phone} onValue={setPhone} />
        <ErrorBox error={error} />
        <button type="submit" disabled={busy}>Register</button>
      </form>
      <p>
        Already a customer? <a href="#/signin">Sign in</a>
      </p>
    </section>
  );
}

export function Verify({ customerId }: { customerId: string }): JSX.Element {
  const [code, setCode] = useState("");
  const { error, busy, submit } = useSubmit(async () => {
    const answer = await publicCall<{ enrollment_token: string }>(
      "POST", `/v1/customers/${encodeURIComponent(customerId)}:verifyEmail`, { code: code.trim() });
    pending.enrollmentToken = answer.enrollment_token;
    navigate("/credentials");
  });
  return (
    <section>
      <Heading>Check your email</Heading>
      <Notice>
        <p>
          We sent a verification code to {pending.email ? <strong>{pending.email}</strong> : "your email address"}. Enter it
          below to confirm the address is yours.
        </p>
      </Notice>
      <form onSubmit={submit} noValidate>
        <Field id="code" label="Verification code" inputMode="numeric" autoComplete="one-time-code" required value={code}
          onValue={setCode} />
        <ErrorBox error={error} />
        <button type="submit" disabled={busy}>Verify email</button>
      </form>
      {pending.email ? <ResendCode email={pending.email} /> : null}
    </section>
  );
}

function ResendCode({ email }: { email: string }): JSX.Element {
  const [sent, setSent] = useState(false);
  const { error, busy, submit } = useSubmit(async () => {
    setSent(false);
    await publicCall("POST", "/v1/customers:resendVerificationCode", { email });
    setSent(true);
  });
  return (
    <form onSubmit={submit} aria-label="Send a new code">
      <p>
        No email? <button type="submit" class="link" disabled={busy}>Send a new code</button>
      </p>
      {sent ? <Notice><p>A new code is on its way; earlier codes no longer work.</p></Notice> : null}
      <ErrorBox error={error} />
    </form>
  );
}

export function Credentials(): JSX.Element {
  const [username, setUsername] = useState("");
  const [password, setPassword] = useState("");
  const { error, busy, submit } = useSubmit(async () => {
    await publicCall("POST", "/v1/credentials", { enrollment_token: pending.enrollmentToken, username: username.trim(), password });
    pending.enrollmentToken = "";
    await signIn(username.trim(), password);
    navigate("/accounts");
  });
  if (!pending.enrollmentToken) {
    return (
      <section>
        <Heading>Create your sign-in</Heading>
        <ErrorBox error={new Error("This step needs a verified email: start again from registration.")} />
        <p>
          <a href="#/register">Register</a>
        </p>
      </section>
    );
  }
  return (
    <section>
      <Heading>Create your sign-in</Heading>
      <Notice>
        <p>Your email is verified. Choose the username and password you will sign in with.</p>
      </Notice>
      <form onSubmit={submit} noValidate>
        <Field id="username" label="Username" autoComplete="username" required hint="3 to 32 letters, digits, dots, dashes or underscores"
          value={username} onValue={setUsername} />
        <Field id="new-password" label="Password" type="password" autoComplete="new-password" required
          hint="A long passphrase is best" value={password} onValue={setPassword} />
        <ErrorBox error={error} />
        <button type="submit" disabled={busy}>Create sign-in</button>
      </form>
    </section>
  );
}

export function SignIn({ notice }: { notice: string | null }): JSX.Element {
  const [reset] = useState(() => {
    const done = afterReset.done;
    afterReset.done = false;
    return done;
  });
  const [username, setUsername] = useState("");
  const [password, setPassword] = useState("");
  const { error, busy, submit } = useSubmit(async () => {
    await signIn(username.trim(), password);
    navigate("/accounts");
  });
  return (
    <section>
      <Heading>Sign in</Heading>
      {reset ? (
        <Notice>
          <p>Your password is changed and every session was signed out. Sign in with the new password.</p>
        </Notice>
      ) : null}
      {notice ? (
        <div class="error" role="alert">
          <p>
            <strong>Your session has ended: {notice}.</strong> Please sign in again.
          </p>
        </div>
      ) : null}
      <form onSubmit={submit} noValidate>
        <Field id="username" label="Username" autoComplete="username" required value={username} onValue={setUsername} />
        <Field id="password" label="Password" type="password" autoComplete="current-password" required value={password}
          onValue={setPassword} />
        <ErrorBox error={error} />
        <button type="submit" disabled={busy}>Sign in</button>
      </form>
      <p>
        <a href="#/forgot">Forgot your password?</a>
      </p>
      <p>
        New to Simple Bank? <a href="#/register">Register</a>
      </p>
    </section>
  );
}
