"""svc_customer's recovery and profile use cases (API.md, "v1 additions") against the fakes:
codes sent again, password resets and changes, email changes, profile updates by mask, the
sweep of stale rows."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from bank.events.v1 import events_pb2

from common.auth import Caller, Role
from svc_customer import service
from svc_customer.store import PendingCode
from tests.unit.conftest import CustomerWorld
from tests.unit.support import ADDRESS, PASSWORD, log_in, onboarded, refusal, registered, wrong

NEW_PASSWORD = "a-brand-new-passphrase"


def ada(customer_id: str, session_id: str | None = None) -> Caller:
    return Caller(customer_id, Role.CUSTOMER, session_id)


def reset_code(w: CustomerWorld) -> str:
    return w.store.events(events_pb2.PasswordResetRequested)[-1].reset_code


async def reset(w: CustomerWorld, code: str, new_password: str = NEW_PASSWORD, email: str = "ada@example.com",
                address: str = ADDRESS) -> None:
    await service.reset_password(w.store, w.codes, w.passwords, w.throttle, w.revocations, email, code, new_password,
                                 address)


async def ask_for_reset(w: CustomerWorld, email: str = "ada@example.com") -> None:
    await service.request_password_reset(w.store, w.codes, w.throttle, email, ADDRESS)


def expire(pending: PendingCode) -> PendingCode:
    return dataclasses.replace(pending, expire_time=datetime.now(UTC) - timedelta(seconds=1))


# --- codes sent again -----------------------------------------------------------------------

async def test_a_resent_code_replaces_the_old_one_and_its_wrong_tries(world: CustomerWorld) -> None:
    customer_id, old = await registered(world)
    await refusal(service.verify_email(world.store, world.codes, world.throttle, customer_id, wrong(old), ADDRESS))
    await service.resend_verification_code(world.store, world.codes, world.throttle, "ADA@example.com", ADDRESS)
    [event] = world.store.events(events_pb2.VerificationCodeResent)
    assert (event.customer_id, event.email, event.full_name) == (customer_id, "ada@example.com", "Ada Lovelace")
    assert world.store.tables.verification_codes[uuid.UUID(customer_id)].failed_attempts == 0
    if old != event.verification_code:  # one chance in a million that they are the same
        stale = await refusal(service.verify_email(world.store, world.codes, world.throttle, customer_id, old, ADDRESS))
        assert stale.reason == "INVALID_CODE"
    await service.verify_email(world.store, world.codes, world.throttle, customer_id, event.verification_code, ADDRESS)


async def test_a_resend_for_an_unknown_or_verified_address_answers_alike_and_sends_nothing(
        world: CustomerWorld) -> None:
    await onboarded(world)
    for email in ("ada@example.com", "nobody@example.com"):
        await service.resend_verification_code(world.store, world.codes, world.throttle, email, ADDRESS)
    assert world.store.events(events_pb2.VerificationCodeResent) == []


async def test_codes_asked_for_one_address_are_limited_whatever_the_answer(world: CustomerWorld) -> None:
    for _ in range(service.CODE_REQUESTS_PER_EMAIL_MAX):
        await service.resend_verification_code(world.store, world.codes, world.throttle, "nobody@example.com",
                                               ADDRESS)
    limited = await refusal(service.resend_verification_code(world.store, world.codes, world.throttle,
                                                             "nobody@example.com", "198.51.100.1"))
    assert (limited.code, limited.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    for _ in range(service.CODE_REQUESTS_PER_EMAIL_MAX):
        await ask_for_reset(world, "nobody@example.com")  # a limit of its own
    assert (await refusal(ask_for_reset(world, "nobody@example.com"))).reason == "RATE_LIMITED"


# --- password reset -------------------------------------------------------------------------

async def test_a_reset_sets_the_password_ends_every_session_and_lifts_the_login_limits(
        world: CustomerWorld) -> None:
    customer_id = await onboarded(world)
    sessions = [await log_in(world) for _ in range(2)]
    for _ in range(3):
        await refusal(log_in(world, password="guess guess guess", address="198.51.100.9"))
    await ask_for_reset(world)
    [asked] = world.store.events(events_pb2.PasswordResetRequested)
    assert (asked.customer_id, asked.email) == (customer_id, "ada@example.com")
    await reset(world, reset_code(world), address="198.51.100.9")
    assert sorted(world.revocations.revoked) == sorted(s.session_id for s in sessions)
    assert all(s.revoked_time is not None for s in world.store.tables.sessions.values())
    [changed] = world.store.events(events_pb2.PasswordChanged)
    assert (changed.customer_id, changed.method) == (customer_id, events_pb2.PasswordChanged.RESET)
    assert world.limiter.count(world.throttle.login_by_username, "ada") == 0
    assert (await refusal(log_in(world))).reason == "BAD_CREDENTIALS"
    await log_in(world, password=NEW_PASSWORD)
    spent = await refusal(reset(world, reset_code(world), "yet another passphrase"))
    assert spent.reason == "INVALID_CODE"


async def test_a_reset_for_an_unknown_address_does_the_same_work_and_no_code_works(world: CustomerWorld) -> None:
    await ask_for_reset(world, "nobody@example.com")
    assert world.store.events(events_pb2.PasswordResetRequested) == []
    assert "nobody@example.com" in world.store.tables.password_resets  # a row all the same (decision 0015)
    for _ in range(service.CODE_ATTEMPTS_MAX):
        assert (await refusal(reset(world, "123456", email="nobody@example.com"))).reason == "INVALID_CODE"
    assert (await refusal(reset(world, "123456", email="nobody@example.com"))).reason == "TOO_MANY_ATTEMPTS"


async def test_five_wrong_reset_codes_void_the_code(world: CustomerWorld) -> None:
    await onboarded(world)
    await ask_for_reset(world)
    code = reset_code(world)
    for tries in range(1, service.CODE_ATTEMPTS_MAX + 1):
        assert (await refusal(reset(world, wrong(code), address="127.0.0.1"))).reason == "INVALID_CODE"
        assert world.store.tables.password_resets["ada@example.com"][0].failed_attempts == tries
    void = await refusal(reset(world, code))
    assert (void.code, void.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ATTEMPTS")
    await log_in(world)  # the password is what it was


async def test_only_the_holder_of_the_right_code_learns_it_expired(world: CustomerWorld) -> None:
    await onboarded(world)
    await ask_for_reset(world)
    code = reset_code(world)
    pending, create_time, used = world.store.tables.password_resets["ada@example.com"]
    world.store.tables.password_resets["ada@example.com"] = (expire(pending), create_time, used)
    assert (await refusal(reset(world, wrong(code)))).reason == "INVALID_CODE"
    assert (await refusal(reset(world, code))).reason == "CODE_EXPIRED"


async def test_a_reset_password_is_judged_with_the_username_once_the_code_is_proven(world: CustomerWorld) -> None:
    await onboarded(world)
    await ask_for_reset(world)
    weak = await refusal(reset(world, "000000", "short"))
    assert weak.reason == "WEAK_PASSWORD"  # before the code: nothing counted
    assert world.store.tables.password_resets["ada@example.com"][0].failed_attempts == 0
    assert (await refusal(reset(world, wrong(reset_code(world)), "ada-is-my-name-here"))).reason == "INVALID_CODE"
    named = await refusal(reset(world, reset_code(world), "ada-is-my-name-here"))
    assert (named.reason, named.field_violations[0][0]) == ("WEAK_PASSWORD", "new_password")
    await reset(world, reset_code(world))  # the code still works for a strong one


# --- password change ------------------------------------------------------------------------

async def test_a_password_change_keeps_the_calling_session_and_ends_the_others(world: CustomerWorld) -> None:
    customer_id = await onboarded(world)
    here, elsewhere = await log_in(world), await log_in(world)
    await service.change_password(world.store, world.passwords, world.throttle, world.revocations,
                                  ada(customer_id, here.session_id), PASSWORD, NEW_PASSWORD, ADDRESS)
    assert world.revocations.revoked == [elsewhere.session_id]
    assert world.store.tables.sessions[uuid.UUID(here.session_id)].revoked_time is None
    [changed] = world.store.events(events_pb2.PasswordChanged)
    assert (changed.email, changed.method) == ("ada@example.com", events_pb2.PasswordChanged.CHANGE)
    await log_in(world, password=NEW_PASSWORD)


async def test_a_password_change_needs_the_current_password_and_a_customer(world: CustomerWorld) -> None:
    customer_id = await onboarded(world)
    me = ada(customer_id, (await log_in(world)).session_id)
    bad = await refusal(service.change_password(world.store, world.passwords, world.throttle, world.revocations, me,
                                                "not the password", NEW_PASSWORD, ADDRESS))
    assert (bad.code, bad.reason) == (grpc.StatusCode.UNAUTHENTICATED, "BAD_CREDENTIALS")
    assert world.limiter.count(world.throttle.login_by_username, "ada") == 1  # a failed login, as API.md says
    weak = await refusal(service.change_password(world.store, world.passwords, world.throttle, world.revocations, me,
                                                 PASSWORD, "ada-is-my-name-here", ADDRESS))
    assert weak.reason == "WEAK_PASSWORD"
    teller = await refusal(service.change_password(world.store, world.passwords, world.throttle, world.revocations,
                                                   Caller("t", Role.TELLER), PASSWORD, NEW_PASSWORD, ADDRESS))
    assert (teller.code, teller.reason) == (grpc.StatusCode.PERMISSION_DENIED, "CUSTOMER_ONLY")
    assert world.store.events(events_pb2.PasswordChanged) == [] and world.revocations.revoked == []


# --- email change ---------------------------------------------------------------------------

async def test_an_email_change_takes_effect_with_the_code_sent_to_the_new_address(world: CustomerWorld) -> None:
    customer_id = await onboarded(world)
    await registered(world, "new@example.com")  # an unverified registration of it: not taken
    unchanged = await service.change_email(world.store, world.codes, world.throttle, ada(customer_id), customer_id,
                                           " New@Example.com ")
    assert unchanged.email == "ada@example.com"  # until the code comes back
    [asked] = world.store.events(events_pb2.EmailChangeRequested)
    assert asked.new_email == "new@example.com"
    wrong_code = await refusal(service.confirm_email_change(world.store, world.codes, world.throttle, ada(customer_id),
                                                            customer_id, wrong(asked.verification_code), ADDRESS))
    assert wrong_code.reason == "INVALID_CODE"
    assert world.store.tables.email_changes[uuid.UUID(customer_id)].failed_attempts == 1
    changed = await service.confirm_email_change(world.store, world.codes, world.throttle, ada(customer_id),
                                                 customer_id, asked.verification_code, ADDRESS)
    assert changed.email == "new@example.com"
    assert [c.email for c in world.store.tables.customers.values()] == ["new@example.com"]  # the other went
    [event] = world.store.events(events_pb2.EmailChanged)
    assert (event.old_email, event.new_email) == ("ada@example.com", "new@example.com")
    again = await refusal(service.confirm_email_change(world.store, world.codes, world.throttle, ada(customer_id),
                                                       customer_id, asked.verification_code, ADDRESS))
    assert (again.code, again.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_EMAIL_CHANGE")


async def test_an_email_change_is_refused_to_the_same_or_a_taken_address_or_for_another(
        world: CustomerWorld) -> None:
    customer_id = await onboarded(world)
    await onboarded(world, "bob@example.com", "bob")
    me = ada(customer_id)
    same = await refusal(service.change_email(world.store, world.codes, world.throttle, me, customer_id,
                                              "ada@example.com"))
    assert (same.reason, same.field_violations[0][0]) == ("INVALID_ARGUMENT", "new_email")
    taken = await refusal(service.change_email(world.store, world.codes, world.throttle, me, customer_id,
                                               "bob@example.com"))
    assert (taken.code, taken.reason) == (grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN")
    for caller in (Caller("t", Role.TELLER), ada(str(uuid.uuid4()))):
        other = await refusal(service.change_email(world.store, world.codes, world.throttle, caller, customer_id,
                                                   "x@example.com"))
        assert other.reason == "CUSTOMER_NOT_FOUND"
    assert world.store.events(events_pb2.EmailChangeRequested) == [] and not world.store.tables.email_changes


async def test_an_expired_or_overtried_email_change_code_is_void(world: CustomerWorld) -> None:
    customer_id = await onboarded(world)
    await service.change_email(world.store, world.codes, world.throttle, ada(customer_id), customer_id,
                               "new@example.com")
    code = world.store.events(events_pb2.EmailChangeRequested)[-1].verification_code
    key = uuid.UUID(customer_id)
    pending = world.store.tables.email_changes[key]
    world.store.tables.email_changes[key] = expire(pending)
    expired = await refusal(service.confirm_email_change(world.store, world.codes, world.throttle, ada(customer_id),
                                                         customer_id, code, ADDRESS))
    assert expired.reason == "CODE_EXPIRED"
    world.store.tables.email_changes[key] = dataclasses.replace(
        pending, failed_attempts=service.CODE_ATTEMPTS_MAX)
    void = await refusal(service.confirm_email_change(world.store, world.codes, world.throttle, ada(customer_id),
                                                      customer_id, code, ADDRESS))
    assert void.reason == "TOO_MANY_ATTEMPTS"
    assert world.store.tables.customers[uuid.UUID(customer_id)].email == "ada@example.com"


# --- profile --------------------------------------------------------------------------------

async def test_an_update_changes_only_the_fields_its_mask_names(world: CustomerWorld) -> None:
    customer_id, _ = await registered(world)
    me = ada(customer_id)
    named = await service.update_customer(world.store, me, customer_id, ["phone_number"], "Ignored Name",
                                          " +14155550123 ")
    assert (named.full_name, named.phone_number) == ("Ada Lovelace", "+14155550123")
    both = await service.update_customer(world.store, me, customer_id, ["full_name", "phone_number"],
                                         "  Ada  King ", "")
    assert (both.full_name, both.phone_number) == ("Ada King", None)  # an empty phone number clears it


@pytest.mark.parametrize(("paths", "full_name", "phone", "field"), [
    ([], "Ada", "", "update_mask"),
    (["email"], "Ada", "", "update_mask"),
    (["full_name", "email_verified"], "Ada", "", "update_mask"),
    (["full_name"], "  ", "", "customer.full_name"),
    (["phone_number"], "Ada", "0123", "customer.phone_number"),
])
async def test_an_update_that_breaks_a_rule_names_the_field_and_changes_nothing(
        world: CustomerWorld, paths: list[str], full_name: str, phone: str, field: str) -> None:
    customer_id, _ = await registered(world)
    before = dict(world.store.tables.customers)
    error = await refusal(service.update_customer(world.store, ada(customer_id), customer_id, paths, full_name, phone))
    assert (error.reason, error.field_violations[0][0]) == ("INVALID_ARGUMENT", field)
    assert world.store.tables.customers == before


async def test_nobody_updates_another_customers_profile(world: CustomerWorld) -> None:
    customer_id, _ = await registered(world)
    for caller in (Caller("t", Role.TELLER), ada(str(uuid.uuid4()))):
        error = await refusal(service.update_customer(world.store, caller, customer_id, ["full_name"], "Eve", ""))
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND")


# --- the sweep --------------------------------------------------------------------------------

async def test_the_sweep_removes_stale_unverified_registrations_and_old_reset_rows(world: CustomerWorld) -> None:
    stale, _ = await registered(world, "stale@example.com")
    fresh, _ = await registered(world, "fresh@example.com")
    verified = await onboarded(world)
    await ask_for_reset(world, "nobody@example.com")
    aged = datetime.now(UTC) - service.UNVERIFIED_TTL - timedelta(hours=1)
    for customer_id in (stale, verified):
        row = world.store.tables.customers[uuid.UUID(customer_id)]
        world.store.tables.customers[row.customer_id] = dataclasses.replace(row, create_time=aged)
    pending, _, used = world.store.tables.password_resets["nobody@example.com"]
    world.store.tables.password_resets["nobody@example.com"] = (pending, aged, used)
    assert await service.sweep(world.store) == (1, 1)
    assert {str(c) for c in world.store.tables.customers} == {fresh, verified}
    assert await service.sweep(world.store) == (0, 0)
