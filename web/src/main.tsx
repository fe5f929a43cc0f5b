// Simple Bank's customer web app: one page, hash routes (#/accounts, ...), the public REST API on
// the same origin. Why this shape: docs/decisions/0017.
import type { JSX } from "preact";
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";

import { onSessionChange, signOut, signedIn } from "./api";
import { AccountStatement, Accounts } from "./pages/accounts";
import { Notifications } from "./pages/notifications";
import { Credentials, Register, SignIn, Verify } from "./pages/onboarding";
import { ForgotPassword, ResetPassword } from "./pages/recovery";
import { SendMoney } from "./pages/transfer";
import { ErrorBox, navigate } from "./ui";

interface Route {
  path: string[];
  query: URLSearchParams;
}

function currentRoute(): Route {
  const [path, query] = window.location.hash.replace(/^#\/?/, "").split("?", 2);
  return { path: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(query ?? "") };
}

const PUBLIC_PAGES = new Set(["signin", "register", "verify", "credentials", "forgot", "reset"]);

function App(): JSX.Element {
  const [route, setRoute] = useState(currentRoute());
  const [isSignedIn, setSignedIn] = useState(signedIn());
  const [ended, setEnded] = useState<string | null>(null);
  const [signOutError, setSignOutError] = useState<unknown>(null);

  useEffect(() => {
    const onHash = () => setRoute(currentRoute());
    window.addEventListener("hashchange", onHash);
    const unsubscribe = onSessionChange((now, why) => {
      setSignedIn(now);
      if (now) {
        setEnded(null);
      } else {
        setEnded(why);
        navigate("/signin");
      }
    });
    return () => {
      window.removeEventListener("hashchange", onHash);
      unsubscribe();
    };
  }, []);

  const page = route.path[0] ?? "";
  let content: JSX.Element;
  if (!isSignedIn && !PUBLIC_PAGES.has(page)) {
    content = <SignIn notice={ended} />;
  } else if (page === "register") {
    content = <Register />;
  } else if (page === "verify" && route.path[1]) {
    content = <Verify customerId={route.path[1]} />;
  } else if (page === "credentials") {
    content = <Credentials />;
  } else if (page === "forgot") {
    content = <ForgotPassword />;
  } else if (page === "reset") {
    content = <ResetPassword />;
  } else if (page === "signin" || !isSignedIn) {
    content = <SignIn notice={ended} />;
  } else if (page === "accounts" && route.path[1]) {
    content = <AccountStatement key={route.path[1]} accountId={route.path[1]} />;
  } else if (page === "transfer") {
    content = <SendMoney key={route.query.get("from") ?? ""} fromAccountId={route.query.get("from") ?? ""} />;
  } else if (page === "notifications") {
    content = <Notifications />;
  } else {
    content = <Accounts />;
  }

  const doSignOut = async () => {
    setSignOutError(null);
    try {
      await signOut();
    } catch (e) {
      setSignOutError(e); // the tokens are forgotten anyway; say the bank did not confirm
    }
  };

  return (
    <>
      <a class="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById("main")?.focus(); }}>
        Skip to content
      </a>
      <header>
        <p class="brand">Simple Bank</p>
        {isSignedIn ? (
          <nav aria-label="Main">
            <a href="#/accounts" aria-current={page === "accounts" && !route.path[1] ? "page" : undefined}>Accounts</a>
            <a href="#/transfer" aria-current={page === "transfer" ? "page" : undefined}>Send money</a>
            <a href="#/notifications" aria-current={page === "notifications" ? "page" : undefined}>Notifications</a>
            <button type="button" class="link" onClick={doSignOut}>Sign out</button>
          </nav>
        ) : null}
      </header>
      <main id="main" tabIndex={-1} key={window.location.hash}>
        <ErrorBox error={signOutError} />
        {content}
      </main>
    </>
  );
}

const root = document.getElementById("app");
if (root) {
  root.textContent = "";
  render(<App />, root);
}
