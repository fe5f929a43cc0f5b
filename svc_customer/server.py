"""svc_customer's gRPC entrypoint: CustomerService and AuthService (public, routed by Envoy) and
CustomerInternalService (internal, for other services only). Thin: requests to use cases,
results to messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from pathlib import Path

import grpc
from bank.auth.v1 import auth_pb2, auth_pb2_grpc
from bank.customer.v1 import customer_internal_pb2, customer_internal_pb2_grpc, customer_pb2, customer_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from common import auth, ratelimit, server
from common.grpcutil import service_name
from common.logging import fields
from common.outbox import OutboxRelay
from svc_customer import service, store
from svc_customer.service import SWEEP_EVERY_S, Codes, IssuedSession, Passwords, Throttle
from svc_customer.store import CustomerStore

log = logging.getLogger("customer")

ACCESS = {
    "/bank.customer.v1.CustomerService/RegisterCustomer": auth.Access.PUBLIC,
    "/bank.customer.v1.CustomerService/VerifyEmail": auth.Access.PUBLIC,
    "/bank.auth.v1.AuthService/CreateCredential": auth.Access.PUBLIC,
    "/bank.auth.v1.AuthService/Login": auth.Access.PUBLIC,
    "/bank.auth.v1.AuthService/RefreshSession": auth.Access.PUBLIC,
    "/bank.customer.v1.CustomerService/ResendVerificationCode": auth.Access.PUBLIC,
    "/bank.auth.v1.AuthService/RequestPasswordReset": auth.Access.PUBLIC,
    "/bank.auth.v1.AuthService/ResetPassword": auth.Access.PUBLIC,
    "/bank.customer.v1.CustomerInternalService/": auth.Access.INTERNAL,
}


def _customer(row: store.Customer) -> customer_pb2.Customer:
    message = customer_pb2.Customer(customer_id=str(row.customer_id), email=row.email, full_name=row.full_name,
                                    email_verified=row.email_verified)
    message.create_time.FromDatetime(row.create_time)
    return message


def _client_address(context: grpc.aio.ServicerContext) -> str:
    return ratelimit.client_address(context.invocation_metadata() or (), context.peer())


def _session(issued: IssuedSession) -> auth_pb2.Session:
    access_expire, refresh_expire = Timestamp(), Timestamp()
    access_expire.FromDatetime(issued.access_token.expire_time)
    refresh_expire.FromDatetime(issued.refresh_expire_time)
    return auth_pb2.Session(session_id=issued.session_id, customer_id=issued.customer_id,
                            access_token=issued.access_token.token, access_token_expire_time=access_expire,
                            refresh_token=issued.refresh_token, refresh_token_expire_time=refresh_expire)


def _session_info(row: store.ActiveSession, caller: auth.Caller) -> auth_pb2.SessionInfo:
    """What a customer sees of a session: times, never a token."""
    info = auth_pb2.SessionInfo(session_id=str(row.session_id), current=str(row.session_id) == caller.session_id)
    info.create_time.FromDatetime(row.create_time)
    info.expire_time.FromDatetime(row.refresh_expire_time)
    if row.last_refresh_time is not None:
        info.last_refresh_time.FromDatetime(row.last_refresh_time)
    return info


class CustomerService(customer_pb2_grpc.CustomerServiceServicer):
    def __init__(self, customers: CustomerStore, codes: Codes, throttle: Throttle) -> None:
        self._customers = customers
        self._codes = codes
        self._throttle = throttle

    async def RegisterCustomer(self, request: customer_pb2.RegisterCustomerRequest,
                               context: grpc.aio.ServicerContext) -> customer_pb2.Customer:
        return _customer(await service.register_customer(self._customers, self._codes, request.email,
                                                         request.full_name, request.phone_number))

    async def VerifyEmail(self, request: customer_pb2.VerifyEmailRequest,
                          context: grpc.aio.ServicerContext) -> customer_pb2.VerifyEmailResponse:
        customer, token = await service.verify_email(self._customers, self._codes, self._throttle,
                                                     request.customer_id, request.code, _client_address(context))
        return customer_pb2.VerifyEmailResponse(customer=_customer(customer), enrollment_token=token)

    async def GetCustomer(self, request: customer_pb2.GetCustomerRequest,
                          context: grpc.aio.ServicerContext) -> customer_pb2.Customer:
        return _customer(await service.get_customer(self._customers, auth.current(), request.customer_id))

    async def ResendVerificationCode(self, request: customer_pb2.ResendVerificationCodeRequest,
                                     context: grpc.aio.ServicerContext) -> customer_pb2.ResendVerificationCodeResponse:
        await service.resend_verification_code(self._customers, self._codes, self._throttle, request.email,
                                               _client_address(context))
        return customer_pb2.ResendVerificationCodeResponse()

    async def UpdateCustomer(self, request: customer_pb2.UpdateCustomerRequest,
                             context: grpc.aio.ServicerContext) -> customer_pb2.Customer:
        return _customer(await service.update_customer(
            self._customers, auth.current(), request.customer.customer_id, list(request.update_mask.paths),
            request.customer.full_name, request.customer.phone_number))

    async def ChangeEmail(self, request: customer_pb2.ChangeEmailRequest,
                          context: grpc.aio.ServicerContext) -> customer_pb2.Customer:
        return _customer(await service.change_email(self._customers, self._codes, self._throttle, auth.current(),
                                                    request.customer_id, request.new_email))

    async def ConfirmEmailChange(self, request: customer_pb2.ConfirmEmailChangeRequest,
                                 context: grpc.aio.ServicerContext) -> customer_pb2.Customer:
        return _customer(await service.confirm_email_change(self._customers, self._codes, self._throttle,
                                                            auth.current(), request.customer_id, request.code,
                                                            _client_address(context)))


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, customers: CustomerStore, codes: Codes, passwords: Passwords, throttle: Throttle,
                 revocations: auth.Revocations, issuer: auth.TokenIssuer, refresh_ttl: timedelta) -> None:
        self._customers = customers
        self._codes = codes
        self._passwords = passwords
        self._throttle = throttle
        self._revocations = revocations
        self._issuer = issuer
        self._refresh_ttl = refresh_ttl

    async def CreateCredential(self, request: auth_pb2.CreateCredentialRequest,
                               context: grpc.aio.ServicerContext) -> auth_pb2.Credential:
        customer_id, username = await service.create_credential(self._customers, self._passwords,
                                                                request.enrollment_token, request.username,
                                                                request.password)
        return auth_pb2.Credential(customer_id=customer_id, username=username)

    async def Login(self, request: auth_pb2.LoginRequest, context: grpc.aio.ServicerContext) -> auth_pb2.Session:
        return _session(await service.login(self._customers, self._passwords, self._throttle, self._issuer,
                                            request.username, request.password, _client_address(context),
                                            refresh_ttl=self._refresh_ttl))

    async def RefreshSession(self, request: auth_pb2.RefreshSessionRequest,
                             context: grpc.aio.ServicerContext) -> auth_pb2.Session:
        return _session(await service.refresh_session(self._customers, self._revocations, self._issuer,
                                                      request.refresh_token))

    async def Logout(self, request: auth_pb2.LogoutRequest, context: grpc.aio.ServicerContext) -> auth_pb2.LogoutResponse:
        await service.logout(self._customers, self._revocations, auth.current(), request.session_id)
        return auth_pb2.LogoutResponse()

    async def ListSessions(self, request: auth_pb2.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> auth_pb2.ListSessionsResponse:
        caller = auth.current()
        rows, token = await service.list_sessions(self._customers, caller, request.customer_id, request.page_size,
                                                  request.page_token)
        return auth_pb2.ListSessionsResponse(sessions=[_session_info(row, caller) for row in rows],
                                             next_page_token=token)

    async def RequestPasswordReset(self, request: auth_pb2.RequestPasswordResetRequest,
                                   context: grpc.aio.ServicerContext) -> auth_pb2.RequestPasswordResetResponse:
        await service.request_password_reset(self._customers, self._codes, self._throttle, request.email,
                                             _client_address(context))
        return auth_pb2.RequestPasswordResetResponse()

    async def ResetPassword(self, request: auth_pb2.ResetPasswordRequest,
                            context: grpc.aio.ServicerContext) -> auth_pb2.ResetPasswordResponse:
        await service.reset_password(self._customers, self._codes, self._passwords, self._throttle,
                                     self._revocations, request.email, request.code, request.new_password,
                                     _client_address(context))
        return auth_pb2.ResetPasswordResponse()

    async def ChangePassword(self, request: auth_pb2.ChangePasswordRequest,
                             context: grpc.aio.ServicerContext) -> auth_pb2.ChangePasswordResponse:
        await service.change_password(self._customers, self._passwords, self._throttle, self._revocations,
                                      auth.current(), request.current_password, request.new_password,
                                      _client_address(context))
        return auth_pb2.ChangePasswordResponse()


class CustomerInternalService(customer_internal_pb2_grpc.CustomerInternalServiceServicer):
    def __init__(self, customers: CustomerStore) -> None:
        self._customers = customers

    async def GetCustomerProfile(self, request: customer_internal_pb2.GetCustomerProfileRequest,
                                 context: grpc.aio.ServicerContext) -> customer_internal_pb2.CustomerProfile:
        row = await service.customer_profile(self._customers, request.customer_id)
        return customer_internal_pb2.CustomerProfile(customer_id=str(row.customer_id), email=row.email,
                                                     full_name=row.full_name, email_verified=row.email_verified)


class TellerBootstrap:
    """Creates or updates the local teller login (BANK_TELLER_USERNAME/PASSWORD) at start."""

    def __init__(self, customers: CustomerStore, passwords: Passwords, username: str, password: str) -> None:
        self._customers, self._passwords = customers, passwords
        self._username, self._password = username, password

    async def start(self) -> None:
        await service.ensure_teller(self._customers, self._passwords, self._username, self._password)

    async def stop(self) -> None:
        pass


class Sweeper:
    """Removes stale unverified registrations and password reset rows, at start and every
    SWEEP_EVERY_S; a failed sweep is logged and tried again next time."""

    def __init__(self, customers: CustomerStore) -> None:
        self._customers = customers
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        # Until stop() cancels it: a sweep every SWEEP_EVERY_S for the life of the process.
        while True:
            try:
                registrations, resets = await service.sweep(self._customers)
                if registrations or resets:
                    log.info("swept stale rows", extra=fields(unverified_registrations=registrations,
                                                                   password_resets=resets))
            except Exception:
                log.exception("sweep failed; trying again later")
            await asyncio.sleep(SWEEP_EVERY_S)


def register(grpc_server: grpc.aio.Server, resources: server.Resources) -> list[str]:
    s = resources.settings
    throttle = Throttle.from_settings(ratelimit.SlidingWindow(resources.redis), s)
    customers = CustomerStore(resources.pool)
    codes = Codes(resources.keys.service_token)
    passwords = Passwords()
    issuer = auth.TokenIssuer(resources.keys, s.access_token_ttl_s)
    customer_pb2_grpc.add_CustomerServiceServicer_to_server(CustomerService(customers, codes, throttle), grpc_server)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(
        AuthService(customers, codes, passwords, throttle, resources.revocations, issuer,
                    timedelta(seconds=s.refresh_token_ttl_s)), grpc_server)
    customer_internal_pb2_grpc.add_CustomerInternalServiceServicer_to_server(CustomerInternalService(customers),
                                                                            grpc_server)
    resources.workers.append(TellerBootstrap(customers, passwords, s.teller_username, s.teller_password))
    resources.workers.append(OutboxRelay(s, resources.pool, "customer"))
    resources.workers.append(Sweeper(customers))
    return [
        service_name(customer_pb2, "CustomerService"),
        service_name(auth_pb2, "AuthService"),
        service_name(customer_internal_pb2, "CustomerInternalService"),
    ]


def main() -> None:
    server.run(server.ServiceSpec("customer", register, Path(__file__).parent / "migrations", access=ACCESS,
                                  signs_tokens=True))
