// Pieces every page uses: the error box, a labelled field, the router's link and navigation.
import type { ComponentChildren, JSX } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";

import { ApiError, NetworkError } from "./api";

export function navigate(path: string): void {
  window.location.hash = `#${path}`;
}

/** Every error as the person should read it: the API's own message, its reason, and which
 * fields were refused. Announced by screen readers (role="alert"). */
export function ErrorBox({ error }: { error: unknown }): JSX.Element | null {
  if (!error) return null;
  if (error instanceof ApiError) {
    return (
      <div class="error" role="alert">
        <p>
          <strong>{error.message}</strong>
          {error.reason ? <span class="reason"> ({error.reason})</span> : null}
        </p>
        {error.violations.some((v) => `${v.field}: ${v.description}` !== error.message) ? (
          <ul>
            {error.violations.map((v) => (
              <li key={v.field}>
                {v.field}: {v.description}
              </li>
            ))}
          </ul>
        ) : null}
      </div>
    );
  }
  const message = error instanceof NetworkError || error instanceof Error ? error.message : String(error);
  return (
    <div class="error" role="alert">
      <p>
        <strong>{message}</strong>
      </p>
    </div>
  );
}

export function Notice({ children }: { children: ComponentChildren }): JSX.Element {
  return (
    <div class="notice" role="status">
      {children}
    </div>
  );
}

interface FieldProps {
  id: string;
  label: string;
  hint?: string;
  value: string;
  onValue: (value: string) => void;
  type?: "text" | "email" | "tel" | "password";
  autoComplete?: string;
  inputMode?: "text" | "numeric" | "decimal" | "email" | "tel";
  required?: boolean;
  maxLength?: number;
  spellcheck?: boolean;
}

/** An input with its <label> and, when given, a hint tied to it by aria-describedby. */
export function Field({ id, label, hint, value, onValue, type = "text", ...input }: FieldProps): JSX.Element {
  return (
    <div class="field">
      <label for={id}>{label}</label>
      <input
        id={id}
        name={id}
        // Preact 11 types an input's attributes per `type` (a union a run-time type cannot pick).
        type={type as "text"}
        value={value}
        onInput={(e) => onValue((e.currentTarget as HTMLInputElement).value)}
        aria-describedby={hint ? `${id}-hint` : undefined}
        {...input}
      />
      {hint ? (
        <p class="hint" id={`${id}-hint`}>
          {hint}
        </p>
      ) : null}
    </div>
  );
}

/** The page's heading, focused when the page opens so keyboard and screen-reader users start there. */
export function Heading({ children }: { children: ComponentChildren }): JSX.Element {
  const ref = useRef<HTMLHeadingElement>(null);
  useEffect(() => {
    ref.current?.focus();
  }, []);
  return (
    <h1 tabIndex={-1} ref={ref}>
      {children}
    </h1>
  );
}

export function when(time: string): string {
  const parsed = Date.parse(time);
  return Number.isNaN(parsed) ? time : new Date(parsed).toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "short" });
}

/** Previous/next over a list's page tokens (AIP-158): the tokens of the pages seen so far. */
export function Pager({
  label,
  hasPrevious,
  nextToken,
  onPrevious,
  onNext,
}: {
  label: string;
  hasPrevious: boolean;
  nextToken: string;
  onPrevious: () => void;
  onNext: (token: string) => void;
}): JSX.Element {
  return (
    <nav class="pager" aria-label={label}>
      <button type="button" onClick={onPrevious} disabled={!hasPrevious}>
        Newer
      </button>
      <button type="button" onClick={() => onNext(nextToken)} disabled={!nextToken}>
        Older
      </button>
    </nav>
  );
}

export interface Page<T> {
  items: T[];
  nextToken: string;
}

/** A paged list: the current page, its error, and moves to older and newer pages. */
export function usePaged<T>(load: (pageToken: string) => Promise<Page<T>>, key: string) {
  const [tokens, setTokens] = useState<string[]>([""]);
  const [page, setPage] = useState<Page<T> | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [loading, setLoading] = useState(true);
  const [version, setVersion] = useState(0);
  const current = tokens[tokens.length - 1];
  // The number of the page on screen, which changes when its lines arrive (not at the click).
  const [shown, setShown] = useState(1);
  useEffect(() => {
    let live = true;
    const number = tokens.length;
    setLoading(true);
    load(current)
      .then((loaded) => live && (setPage(loaded), setShown(number), setError(null)))
      .catch((e: unknown) => live && setError(e))
      .finally(() => live && setLoading(false));
    return () => {
      live = false;
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [current, key, version]);
  return {
    page,
    error,
    loading,
    pageNumber: shown,
    hasPrevious: tokens.length > 1,
    previous: () => setTokens((t) => (t.length > 1 ? t.slice(0, -1) : t)),
    next: (token: string) => token && setTokens((t) => [...t, token]),
    reload: () => setVersion((v) => v + 1),
  };
}

/** A form's submission: its error and whether it is under way (a second submit meanwhile is ignored). */
export function useSubmit(action: () => Promise<void>) {
  const [error, setError] = useState<unknown>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (event: Event) => {
    event.preventDefault();
    if (busy) return;
    setBusy(true);
    setError(null);
    try {
      await action();
    } catch (e) {
      setError(e);
    } finally {
      setBusy(false);
    }
  };
  return { error, busy, submit };
}
