"""svc_customer's use cases (service.py) against the fakes of its store and of Redis:
registration and its codes, credentials, logins and their limits, sessions (API.md)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from bank.events.v1 import events_pb2

from common.auth import Caller, Role
from svc_customer import service
from tests.unit.conftest import LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS_MAX, VERIFY_FAILURES_PER_ADDRESS_MAX, CustomerWorld
from tests.unit.support import ADDRESS, PASSWORD, REFRESH_TTL, enrolled, log_in, onboarded, refusal, registered, wrong

# --- registration and verification ----------------------------------------------------------

async def test_a_registration_is_unverified_and_its_code_is_emailed_not_stored(world: CustomerWorld) -> None:
    customer = await service.register_customer(world.store, world.codes, "  Ada@Example.COM ", " Ada   Lovelace ",
                                               "+14155550123")
    assert (customer.email, customer.full_name, customer.phone_number, customer.email_verified) == \
        ("ada@example.com", "Ada Lovelace", "+14155550123", False)
    [event] = world.store.events(events_pb2.CustomerRegistered)
    assert (event.customer_id, event.email) == (str(customer.customer_id), "ada@example.com")
    stored = world.store.tables.verification_codes[customer.customer_id]
    assert stored.code_hash == world.codes.verification(customer.customer_id, event.verification_code)
    assert event.verification_code.encode() not in stored.code_hash


@pytest.mark.parametrize(("email", "full_name", "phone", "field"), [
    ("not-an-email", "Ada", "", "email"),
    ("a" * 250 + "@x.io", "Ada", "", "email"),
    ("ada@example.com", "   ", "", "full_name"),
    ("ada@example.com", "A" * (service.FULL_NAME_LENGTH_MAX + 1), "", "full_name"),
    ("ada@example.com", "Ada", "555-0123", "phone_number"),
])
async def test_a_registration_with_a_bad_field_names_it_and_writes_nothing(
        world: CustomerWorld, email: str, full_name: str, phone: str, field: str) -> None:
    error = await refusal(service.register_customer(world.store, world.codes, email, full_name, phone))
    assert (error.reason, [f for f, _ in error.field_violations]) == ("INVALID_ARGUMENT", [field])
    assert not world.store.tables.customers and not world.store.tables.outbox


async def test_an_unverified_address_can_be_registered_again_a_verified_one_cannot(world: CustomerWorld) -> None:
    first, _ = await registered(world)
    second, code = await registered(world)
    assert set(map(str, world.store.tables.customers)) == {second}  # the first is gone, its code with it
    assert set(map(str, world.store.tables.verification_codes)) == {second}
    await service.verify_email(world.store, world.codes, world.throttle, second, code, ADDRESS)
    taken = await refusal(service.register_customer(world.store, world.codes, "ada@example.com", "Eve", ""))
    assert (taken.code, taken.reason) == (grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN")
    assert set(map(str, world.store.tables.customers)) == {second} and first != second


async def test_the_right_code_verifies_once_and_gives_an_enrollment_token(world: CustomerWorld) -> None:
    customer_id, code = await registered(world)
    customer, token = await service.verify_email(world.store, world.codes, world.throttle, customer_id, code, ADDRESS)
    assert customer.email_verified and token
    assert [e.customer_id for e in world.store.events(events_pb2.EmailVerified)] == [customer_id]
    again = await refusal(service.verify_email(world.store, world.codes, world.throttle, customer_id, code, ADDRESS))
    assert (again.code, again.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_VERIFIED")


async def test_five_wrong_codes_void_the_code_for_good(world: CustomerWorld) -> None:
    customer_id, code = await registered(world)
    for tries in range(1, service.CODE_ATTEMPTS_MAX + 1):
        error = await refusal(service.verify_email(world.store, world.codes, world.throttle, customer_id,
                                                   wrong(code), "127.0.0.1"))
        assert error.reason == "INVALID_CODE"
        # Counted although the use case refused: the count commits, the error comes after.
        assert world.store.tables.verification_codes[uuid.UUID(customer_id)].failed_attempts == tries
    void = await refusal(service.verify_email(world.store, world.codes, world.throttle, customer_id, code, ADDRESS))
    assert (void.code, void.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ATTEMPTS")
    assert not world.store.tables.customers[uuid.UUID(customer_id)].email_verified


@pytest.mark.parametrize(("customer_id", "code", "reason"), [
    ("not-a-uuid", "123456", "CUSTOMER_NOT_FOUND"),
    (str(uuid.uuid4()), "123456", "CUSTOMER_NOT_FOUND"),
    (None, "12345", "INVALID_CODE"),
    (None, "12345a", "INVALID_CODE"),
])
async def test_a_code_for_nobody_or_of_the_wrong_shape_is_refused(world: CustomerWorld, customer_id: str | None,
                                                                  code: str, reason: str) -> None:
    real_id, _ = await registered(world)
    error = await refusal(service.verify_email(world.store, world.codes, world.throttle, customer_id or real_id, code,
                                               ADDRESS))
    assert error.reason == reason
    assert world.store.tables.verification_codes[uuid.UUID(real_id)].failed_attempts == 0


async def test_an_expired_code_is_refused_as_expired(world: CustomerWorld) -> None:
    customer_id, code = await registered(world)
    row = world.store.tables.verification_codes[uuid.UUID(customer_id)]
    world.store.tables.verification_codes[row.customer_id] = dataclasses.replace(
        row, expire_time=datetime.now(UTC) - timedelta(seconds=1))
    error = await refusal(service.verify_email(world.store, world.codes, world.throttle, customer_id, code, ADDRESS))
    assert error.reason == "CODE_EXPIRED"


async def test_wrong_codes_from_one_address_across_registrations_are_rate_limited(world: CustomerWorld) -> None:
    guesses = [await registered(world, f"victim{n}@example.com") for n in range(VERIFY_FAILURES_PER_ADDRESS_MAX + 1)]
    for customer_id, code in guesses[:-1]:
        await refusal(service.verify_email(world.store, world.codes, world.throttle, customer_id, wrong(code), ADDRESS))
    customer_id, code = guesses[-1]
    limited = await refusal(service.verify_email(world.store, world.codes, world.throttle, customer_id, code, ADDRESS))
    assert (limited.reason, limited.retry_after_s is not None) == ("RATE_LIMITED", True)
    # Another address (or an exempt one) is not held back by this one's guesses.
    await service.verify_email(world.store, world.codes, world.throttle, customer_id, code, "198.51.100.1")


# --- credentials ----------------------------------------------------------------------------

async def test_an_enrollment_token_buys_one_credential(world: CustomerWorld) -> None:
    token = await enrolled(world)
    customer_id, username = await service.create_credential(world.store, world.passwords, token, " Ada ", PASSWORD)
    assert username == "ada" and customer_id in {str(c) for c in world.store.tables.customers}
    spent = await refusal(service.create_credential(world.store, world.passwords, token, "ada2", PASSWORD))
    assert (spent.code, spent.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_ENROLLMENT_TOKEN")
    other = await enrolled(world, "bob@example.com")
    taken = await refusal(service.create_credential(world.store, world.passwords, other, "ada", PASSWORD))
    assert (taken.code, taken.reason) == (grpc.StatusCode.ALREADY_EXISTS, "USERNAME_TAKEN")
    # The refused one did not spend its token: the same token, another username, works.
    await service.create_credential(world.store, world.passwords, other, "bob", PASSWORD)


@pytest.mark.parametrize(("username", "password", "reason"), [
    ("ada", "short", "WEAK_PASSWORD"),
    ("ada", "x" * (service.PASSWORD_LENGTH_MAX + 1), "WEAK_PASSWORD"),
    ("ada", "Password123", "WEAK_PASSWORD"),  # common, whatever the case
    ("ada", "abababababab", "WEAK_PASSWORD"),  # repetitive
    ("lovelace", "i-am-LOVELACE-really", "WEAK_PASSWORD"),  # contains the username
    ("a", PASSWORD, "INVALID_ARGUMENT"),
    ("-ada", PASSWORD, "INVALID_ARGUMENT"),
])
async def test_a_weak_password_or_bad_username_is_refused_and_the_token_kept(
        world: CustomerWorld, username: str, password: str, reason: str) -> None:
    token = await enrolled(world)
    error = await refusal(service.create_credential(world.store, world.passwords, token, username, password))
    assert error.reason == reason
    assert not world.store.tables.credentials
    await service.create_credential(world.store, world.passwords, token, "ada", PASSWORD)


async def test_an_expired_or_made_up_enrollment_token_is_refused(world: CustomerWorld) -> None:
    token = await enrolled(world)
    [(token_hash, (customer_id, _, _))] = world.store.tables.enrollment_tokens.items()
    world.store.tables.enrollment_tokens[token_hash] = (customer_id, datetime.now(UTC) - timedelta(seconds=1), None)
    for candidate in (token, "made-up", "x" * 257, ""):
        error = await refusal(service.create_credential(world.store, world.passwords, candidate, "ada", PASSWORD))
        assert error.reason == "INVALID_ENROLLMENT_TOKEN"


# --- logins, their limits, sessions -----------------------------------------------------------

async def test_a_login_gives_a_session_whose_token_names_the_customer(world: CustomerWorld) -> None:
    customer_id = await onboarded(world)
    session = await log_in(world, " ADA ")
    caller = world.verifier.verify(session.access_token.token)
    assert (caller.subject, caller.role, caller.session_id) == (customer_id, Role.CUSTOMER, session.session_id)
    assert session.customer_id == customer_id
    assert session.refresh_expire_time - datetime.now(UTC) > REFRESH_TTL - timedelta(minutes=1)


@pytest.mark.parametrize(("username", "password"), [("ada", "not the password"), ("nobody", PASSWORD),
                                                    ("ada", "x" * 1000), ("a" * 100, PASSWORD)])
async def test_a_wrong_password_and_an_unknown_username_are_the_same_refusal(
        world: CustomerWorld, username: str, password: str) -> None:
    await onboarded(world)
    error = await refusal(log_in(world, username, password))
    assert (error.code, error.reason, error.message) == (grpc.StatusCode.UNAUTHENTICATED, "BAD_CREDENTIALS",
                                                         "wrong username or password")


async def test_failed_logins_of_a_username_from_an_address_lock_it_there_until_they_age(world: CustomerWorld) -> None:
    await onboarded(world)
    for _ in range(LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS_MAX):
        assert (await refusal(log_in(world, password="guess guess guess"))).reason == "BAD_CREDENTIALS"
    locked = await refusal(log_in(world))  # the right password too: nothing is checked
    assert (locked.code, locked.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert locked.retry_after_s is not None and 0 < locked.retry_after_s <= 900
    await log_in(world, address="198.51.100.1")  # the owner, elsewhere, still logs in
    # Unknown usernames count alike: a limit only known ones hit would tell which exist.
    for _ in range(LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS_MAX):
        await refusal(log_in(world, "nobody"))
    assert (await refusal(log_in(world, "nobody"))).reason == "RATE_LIMITED"


async def test_a_right_password_ends_the_run_of_failures_from_its_address(world: CustomerWorld) -> None:
    await onboarded(world)
    for _ in range(LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS_MAX - 1):
        await refusal(log_in(world, password="guess guess guess"))
    await log_in(world)
    for _ in range(LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS_MAX - 1):
        await refusal(log_in(world, password="guess guess guess"))
    await log_in(world)  # not locked: the count started again after the right one
    by_username = world.limiter.count(world.throttle.login_by_username, "ada")
    assert by_username == 2 * (LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS_MAX - 1)  # from anywhere: still counted


async def test_a_refresh_token_works_once_and_its_reuse_ends_the_session(world: CustomerWorld) -> None:
    await onboarded(world)
    session = await log_in(world)
    fresh = await service.refresh_session(world.store, world.revocations, world.issuer, session.refresh_token)
    assert (fresh.session_id, fresh.refresh_expire_time) == (session.session_id, session.refresh_expire_time)
    assert fresh.refresh_token != session.refresh_token
    reused = await refusal(service.refresh_session(world.store, world.revocations, world.issuer,
                                                   session.refresh_token))
    assert (reused.code, reused.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
    assert world.revocations.revoked == [session.session_id]  # its access tokens stop at once too
    after = await refusal(service.refresh_session(world.store, world.revocations, world.issuer, fresh.refresh_token))
    assert after.reason == "SESSION_REVOKED"
    unknown = await refusal(service.refresh_session(world.store, world.revocations, world.issuer, "made-up"))
    assert unknown.reason == "INVALID_REFRESH_TOKEN"


async def test_an_expired_session_does_not_refresh(world: CustomerWorld) -> None:
    await onboarded(world)
    session = await log_in(world)
    row = world.store.tables.sessions[uuid.UUID(session.session_id)]
    row.refresh_expire_time = datetime.now(UTC) - timedelta(seconds=1)
    error = await refusal(service.refresh_session(world.store, world.revocations, world.issuer,
                                                  session.refresh_token))
    assert error.reason == "SESSION_EXPIRED"


async def test_a_customer_logs_out_their_own_sessions_only(world: CustomerWorld) -> None:
    ada = await onboarded(world)
    await service.create_credential(world.store, world.passwords, await enrolled(world, "bob@example.com"), "bob",
                                    PASSWORD)
    mine, bobs = await log_in(world), await log_in(world, "bob")
    me = Caller(ada, Role.CUSTOMER, mine.session_id)
    for session_id in (bobs.session_id, "not-a-uuid", str(uuid.uuid4())):
        assert (await refusal(service.logout(world.store, world.revocations, me, session_id))).reason == \
            "SESSION_NOT_FOUND"
    await service.logout(world.store, world.revocations, me, mine.session_id)
    assert world.revocations.revoked == [mine.session_id]
    assert (await refusal(service.refresh_session(world.store, world.revocations, world.issuer,
                                                  mine.refresh_token))).reason == "SESSION_REVOKED"


async def test_sessions_are_listed_to_their_customer_newest_first_in_pages(world: CustomerWorld) -> None:
    ada = await onboarded(world)
    opened = [await log_in(world) for _ in range(5)]
    await service.logout(world.store, world.revocations, Caller(ada, Role.CUSTOMER), opened[0].session_id)
    me = Caller(ada, Role.CUSTOMER, opened[-1].session_id)
    seen, token = [], ""
    for _ in range(5):  # bounded: 4 sessions in pages of 3
        page, token = await service.list_sessions(world.store, me, ada, 3, token)
        seen += [str(s.session_id) for s in page]
        if not token:
            break
    assert seen == [s.session_id for s in reversed(opened[1:])]
    for caller in (Caller(str(uuid.uuid4()), Role.CUSTOMER), Caller("teller-1", Role.TELLER)):
        assert (await refusal(service.list_sessions(world.store, caller, ada, 3, ""))).reason == "CUSTOMER_NOT_FOUND"


async def test_a_customer_is_seen_by_themselves_and_tellers_only(world: CustomerWorld) -> None:
    ada, _ = await registered(world)
    assert str((await service.get_customer(world.store, Caller(ada, Role.CUSTOMER), ada)).customer_id) == ada
    assert str((await service.get_customer(world.store, Caller("t", Role.TELLER), ada)).customer_id) == ada
    other = await refusal(service.get_customer(world.store, Caller(str(uuid.uuid4()), Role.CUSTOMER), ada))
    assert (other.code, other.reason) == (grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND")


async def test_the_teller_login_is_made_at_start_and_is_no_customers(world: CustomerWorld) -> None:
    await service.ensure_teller(world.store, world.passwords, " Teller ", "teller-local-password")
    session = await log_in(world, "teller", "teller-local-password")
    caller = world.verifier.verify(session.access_token.token)
    assert (caller.role, session.customer_id) == (Role.TELLER, "")
    await service.ensure_teller(world.store, world.passwords, "teller", "a-new-teller-password")  # a new password
    await log_in(world, "teller", "a-new-teller-password")
    await onboarded(world)
    with pytest.raises(RuntimeError):
        await service.ensure_teller(world.store, world.passwords, "ada", "teller-local-password")
