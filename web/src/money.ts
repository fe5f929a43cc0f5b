// Money as the API carries it: an int64 count of the currency's minor unit, as a JSON string.
// Shown and typed in the currency's own units (12.34 EUR, 1234 JPY); never through a float.

const INT64_MAX = 9223372036854775807n;

/** Decimal places of an ISO 4217 currency (2 for EUR, 0 for JPY), from the browser's own table. */
export function currencyDigits(currency: string): number {
  try {
    return new Intl.NumberFormat("en", { style: "currency", currency }).resolvedOptions().maximumFractionDigits ?? 2;
  } catch {
    return 2; // a code the browser does not know: the API's default minor unit
  }
}

/** "1234" EUR -> "12.34", as a person types it (parseAmount reads it back); "1234" JPY -> "1234". */
export function formatAmount(minor: string | number | bigint, currency: string): string {
  let units = BigInt(minor);
  const negative = units < 0n;
  if (negative) units = -units;
  const digits = currencyDigits(currency);
  let text = units.toString();
  if (digits > 0) {
    const padded = text.padStart(digits + 1, "0");
    text = `${padded.slice(0, -digits)}.${padded.slice(-digits)}`;
  }
  return `${negative ? "-" : ""}${text}`;
}

/** "1234" EUR -> "12.34 EUR"; "-5" USD -> "-0.05 USD"; "1234" JPY -> "1234 JPY". */
export function formatMoney(minor: string | number | bigint, currency: string): string {
  return `${formatAmount(minor, currency)} ${currency}`;
}

export class AmountError extends Error {}

/** What a person typed ("12.34", "12", "1234") as minor units; refuses what the currency cannot hold. */
export function parseAmount(typed: string, currency: string): bigint {
  const text = typed.trim();
  const digits = currencyDigits(currency);
  const match = /^(\d+)(?:\.(\d+))?$/.exec(text);
  if (!match) {
    throw new AmountError(digits > 0 ? `Enter an amount such as 12.${"5".repeat(digits)}` : "Enter a whole amount such as 1234");
  }
  const fraction = match[2] ?? "";
  if (fraction.length > digits) {
    throw new AmountError(digits === 0 ? `${currency} has no decimal places` : `${currency} has ${digits} decimal places at most`);
  }
  const minor = BigInt(match[1]) * 10n ** BigInt(digits) + BigInt(fraction.padEnd(digits, "0") || "0");
  if (minor <= 0n) throw new AmountError("The amount must be more than zero");
  if (minor > INT64_MAX) throw new AmountError("The amount is too large");
  return minor;
}
