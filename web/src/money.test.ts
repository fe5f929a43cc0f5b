import assert from "node:assert/strict";
import { test } from "node:test";

import { AmountError, formatAmount, formatMoney, parseAmount } from "./money";

test("amounts are shown in the currency's units", () => {
  assert.equal(formatMoney("1234", "EUR"), "12.34 EUR");
  assert.equal(formatMoney("1234", "JPY"), "1234 JPY");
  assert.equal(formatMoney("5", "USD"), "0.05 USD");
  assert.equal(formatMoney("-1250", "GBP"), "-12.50 GBP");
  assert.equal(formatMoney("0", "EUR"), "0.00 EUR");
  assert.equal(formatMoney("9223372036854775807", "USD"), "92233720368547758.07 USD");
});

test("typed amounts become minor units without floating point", () => {
  assert.equal(parseAmount("12.34", "EUR"), 1234n);
  assert.equal(parseAmount(" 12 ", "EUR"), 1200n);
  assert.equal(parseAmount("0.1", "USD"), 10n);
  assert.equal(parseAmount("1234", "JPY"), 1234n);
  assert.equal(parseAmount("92233720368547758.07", "USD"), 9223372036854775807n);
});

test("amounts the currency cannot hold are refused with a reason", () => {
  for (const [typed, currency] of [["12.345", "EUR"], ["12.5", "JPY"], ["0", "EUR"], ["0.00", "USD"], ["-1", "EUR"],
    ["1e3", "EUR"], ["", "EUR"], ["92233720368547758.08", "USD"]]) {
    assert.throws(() => parseAmount(typed, currency), AmountError, `${typed} ${currency}`);
  }
});

test("an amount shown for editing reads back as the same minor units", () => {
  for (const [minor, currency, typed] of [["3000", "EUR", "30.00"], ["5", "USD", "0.05"], ["1234", "JPY", "1234"]]) {
    assert.equal(formatAmount(minor, currency), typed);
    assert.equal(parseAmount(typed, currency), BigInt(minor));
  }
});
